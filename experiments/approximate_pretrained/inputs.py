"""The inputs the experiment embeds: single sentences, and documents of same-label sentences.

Sentiment sentences are short (Rotten Tomatoes: 27 word pieces on average, 79 at most), and with
fewer queries than clusters clustered attention uses one cluster per query. To see where the
approximation bites, sentences of one label are also packed into documents of up to 128, 256 or
512 word pieces (``[CLS] s1 s2 ... [SEP]``, MiniLM's position table has 512 rows), which keep
the label of their sentences.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch

SENTENCES = "sentences"
LENGTH_BUCKETS = ((1, 25), (26, 32), (33, 48), (49, 512))  # tokens incl. [CLS]/[SEP]


class Inputs(NamedTuple):
    """Token ids (with [CLS]/[SEP]) and labels of one split of one kind of input."""

    ids: List[List[int]]
    labels: List[int]


def tier_name(target: int) -> str:
    return SENTENCES if target == 0 else f"docs<={target}"


def bucket_of(length: int) -> str:
    for lo, hi in LENGTH_BUCKETS:
        if lo <= length <= hi:
            return f"{lo}-{hi}"
    raise ValueError(f"length {length} is outside every bucket {LENGTH_BUCKETS}")


def sentences(pieces: Sequence[List[int]], labels: Sequence[int], cls: int, sep: int) -> Inputs:
    """One input per sentence. ``pieces``: word-piece ids without special tokens."""
    return Inputs([[cls, *p, sep] for p in pieces], list(labels))


def documents(
    pieces: Sequence[List[int]],
    labels: Sequence[int],
    cls: int,
    sep: int,
    target: int,
    count: int,
    seed: int,
    reuse: bool = True,
) -> Inputs:
    """Up to ``count`` documents (half of each label when possible) of at most ``target`` tokens.

    For each label: shuffle its sentences (a ``torch.Generator`` seeded with ``seed``), pack them
    greedily in that order, and start a new document when the next sentence would not fit.
    With ``reuse``, when one pass over the sentences gives fewer documents than asked, reshuffle
    and pack again (documents then share sentences but not their combination); without it, stop
    after one pass. A pass's last, underfilled document is dropped. Sentences longer than
    ``target - 2`` are skipped.
    """
    generator = torch.Generator().manual_seed(seed)
    budget = target - 2
    out_ids: List[List[int]] = []
    out_labels: List[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label and 0 < len(pieces[i]) <= budget]
        want = (count + 1) // 2 if label == 0 else count // 2
        made = 0
        while made < want and members:
            current: List[int] = []
            packed_any = False
            for j in torch.randperm(len(members), generator=generator).tolist():
                piece = pieces[members[j]]
                if len(current) + len(piece) > budget:
                    out_ids.append([cls, *current, sep])
                    out_labels.append(label)
                    made += 1
                    packed_any = True
                    current = []
                    if made == want:
                        break
                current.extend(piece)
            if not packed_any or not reuse:
                break  # one pass only, or this label's sentences do not fill one document
    return Inputs(out_ids, out_labels)


def stats(ids: Sequence[Sequence[int]]) -> Tuple[float, int, int]:
    lengths = [len(x) for x in ids]
    return sum(lengths) / max(len(lengths), 1), min(lengths, default=0), max(lengths, default=0)
