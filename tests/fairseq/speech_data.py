"""A tiny speech_to_text data directory with a character vocabulary, built on the fly.

Each character has a fixed 80-dim "acoustic" prototype; an utterance is its characters'
prototypes held for a few frames each, plus noise. So the features are learnable (a CTC model
can align them) while taking milliseconds to make. The layout is fairseq's speech_to_text one:

    root/config.yaml        input_feat_per_channel: 80, vocab_filename: dict.txt, audio_root: ""
    root/dict.txt           one character a line plus "|", the word boundary
    root/train.tsv ...      id, audio (absolute path to a .npy), n_frames, tgt_text, speaker
    root/feats/*.npy        float32 (n_frames, 80)

``tgt_text`` holds characters separated by spaces with ``|`` between words (``t w o | s i x``):
with no pre-tokenizer or BPE in config.yaml, fairseq splits targets on whitespace, so every
character is one unit, and ``--post-process letter`` (the ctc criterion's default) turns units
back into words for the WER.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_FEATS = 80
WORD_BOUNDARY = "|"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class SpeechData:
    root: Path
    splits: dict[str, list[str]]  # split name -> transcripts ("two six"), in manifest order


def units(sentence: str) -> str:
    """``"two six"`` -> ``"t w o | s i x"``: the tgt_text form of a transcript."""
    return f" {WORD_BOUNDARY} ".join(" ".join(word) for word in sentence.split())


def _features(rng: np.random.Generator, prototypes: dict[str, np.ndarray], sentence: str,
              frames_per_unit: tuple[int, int]) -> np.ndarray:
    blocks = []
    for unit in units(sentence).split():
        n = int(rng.integers(frames_per_unit[0], frames_per_unit[1] + 1))
        blocks.append(prototypes[unit] + 0.3 * rng.standard_normal((n, N_FEATS)))
    return np.concatenate(blocks).astype(np.float32)  # (n_frames, 80)


def make_speech_data(root: Path, *, sizes: dict[str, int] | None = None, words_per_utterance=(2, 3),
                     frames_per_unit=(10, 16), seed: int = 0) -> SpeechData:
    """Write manifests, features, dict.txt and config.yaml under ``root`` (absolute paths only)."""
    root = Path(root).resolve()
    sizes = sizes or {"train": 12, "valid": 4}
    rng = np.random.default_rng(seed)
    alphabet = sorted({c for w in WORDS for c in w} | {WORD_BOUNDARY})
    prototypes = {c: 2.0 * rng.standard_normal(N_FEATS) for c in alphabet}
    (root / "feats").mkdir(parents=True, exist_ok=True)

    splits: dict[str, list[str]] = {}
    counts = dict.fromkeys(alphabet, 0)
    for split, n in sizes.items():
        rows, sentences = [], []
        for i in range(n):
            n_words = int(rng.integers(words_per_utterance[0], words_per_utterance[1] + 1))
            sentence = " ".join(rng.choice(WORDS, size=n_words))
            feats = _features(rng, prototypes, sentence, frames_per_unit)
            path = root / "feats" / f"{split}_{i}.npy"
            np.save(path, feats)
            rows.append({"id": f"{split}_{i}", "audio": path.as_posix(), "n_frames": len(feats),
                         "tgt_text": units(sentence), "speaker": f"spk{i % 2}"})
            sentences.append(sentence)
            for unit in units(sentence).split():
                counts[unit] += 1
        with open(root / f"{split}.tsv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t",
                                    quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        splits[split] = sentences

    with open(root / "dict.txt", "w") as f:
        for unit in sorted(alphabet, key=lambda u: (-counts[u], u)):
            f.write(f"{unit} {max(counts[unit], 1)}\n")
    (root / "config.yaml").write_text(
        f"input_feat_per_channel: {N_FEATS}\ninput_channels: 1\nvocab_filename: dict.txt\naudio_root: ''\n"
    )
    return SpeechData(root=root, splits=splits)
