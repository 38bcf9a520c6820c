"""Card-table sentences from a small random grammar: the synthetic corpus's default text.

Sentences chain two to four clauses about playing cards, players, piles and scores ("player three
puts the seven of clubs on the queen of hearts and then the dealer turns over two cards"), 8-20
words with a vocabulary of about 120 words. A closed vocabulary lets a small CTC model learn
spelling within minutes; the chains make utterances long (3-9 s, 300-900 frames at 10 ms) so
that attention over every frame costs something. The vocabulary covers the card phrases of
pocketsphinx-testdata's ``cards`` clips ("eight of spades four of clubs"), used in the smoke check.

    sentences(random.Random(0), 3)  # three sentences
"""

from __future__ import annotations

import random

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]  # fmt: skip
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
RANKS = ["ace", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "jack", "queen", "king"]
SUITS = ["clubs", "diamonds", "hearts", "spades"]
COLOURS = ["red", "black"]
PLAYERS = ["the dealer", "my partner", "your sister", "the old man", "everybody", "nobody", "the winner",
           "the player on the left", "the player on the right"]  # fmt: skip
PLACES = ["the table", "the deck", "the discard pile", "the top of the pile", "the bottom of the deck",
          "the middle row", "the last column", "my hand", "your hand"]  # fmt: skip
MOVES = ["puts", "places", "moves", "slides", "drops"]
RELATIONS = ["on", "under", "next to", "above", "below", "beside"]
TAKES = ["draws", "takes", "picks up", "discards", "shows", "hides", "turns over", "keeps"]
CONNECTORS = ["and", "and then", "but", "before", "after", "while", "so", "because", "until"]
MOODS = ["quickly", "slowly", "carefully", "quietly", "again", "twice", "at once", "without a word"]
ADJECTIVES = ["lucky", "winning", "highest", "lowest", "last", "first", "only", "same"]


def number(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(NUMBERS)
    tens = rng.choice(TENS)
    return tens if rng.random() < 0.3 else f"{tens} {rng.choice(NUMBERS[:9])}"


def player(rng: random.Random) -> str:
    return f"player {rng.choice(NUMBERS[:6])}" if rng.random() < 0.4 else rng.choice(PLAYERS)


def card(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.7:
        return f"the {rng.choice(RANKS)} of {rng.choice(SUITS)}"
    if roll < 0.85:
        return f"the {rng.choice(ADJECTIVES)} {rng.choice(COLOURS)} card"
    return f"{rng.choice(NUMBERS[1:6])} {rng.choice(COLOURS)} cards"


def clause(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        text = f"{player(rng)} {rng.choice(MOVES)} {card(rng)} {rng.choice(RELATIONS)} {card(rng)}"
    elif kind == 1:
        text = f"{player(rng)} {rng.choice(TAKES)} {card(rng)} from {rng.choice(PLACES)}"
    elif kind == 2:
        text = f"the score is {number(rng)} to {number(rng)} after round {rng.choice(NUMBERS[:12])}"
    elif kind == 3:
        text = f"{player(rng)} {rng.choice(TAKES)} {rng.choice(NUMBERS[1:8])} cards"
    elif kind == 4:
        text = f"{card(rng)} {rng.choice(['goes', 'stays', 'lands'])} {rng.choice(RELATIONS)} {rng.choice(PLACES)}"
    else:
        text = f"{rng.choice(RANKS)} of {rng.choice(SUITS)} {rng.choice(RANKS)} of {rng.choice(SUITS)}"
    if rng.random() < 0.25:
        text += f" {rng.choice(MOODS)}"
    return text


def sentence(rng: random.Random, min_words: int = 8, max_words: int = 20) -> str:
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    # 2-4 clauses of ~10 words (the default corpus); longer sentences take proportionally more
    extra = (1, 3) if max_words <= 20 else (max(1, min_words // 10), max(2, max_words // 10))
    while True:
        parts = [clause(rng)]
        for _ in range(rng.randint(*extra)):
            parts += [rng.choice(CONNECTORS), clause(rng)]
        text = " ".join(parts)
        if min_words <= len(text.split()) <= max_words:
            return text


def sentences(rng: random.Random, count: int, exclude: set[str] = frozenset(), **kwargs) -> list[str]:
    """``count`` distinct sentences, none of them in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < count:
        text = sentence(rng, **kwargs)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def vocabulary() -> set[str]:
    words = {"of", "the", "player", "card", "cards", "from", "score", "is", "to", "after", "round", "goes", "stays",
             "lands"}  # fmt: skip
    for group in (NUMBERS, TENS, RANKS, SUITS, COLOURS, PLAYERS, PLACES, MOVES, RELATIONS, TAKES, CONNECTORS,
                  MOODS, ADJECTIVES):  # fmt: skip
        for phrase in group:
            words.update(phrase.split())
    return words
