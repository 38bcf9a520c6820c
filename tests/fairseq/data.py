"""Tiny text datasets for fairseq smoke tests, built with the real fairseq-preprocess.

    masked_lm_data(root)            root/bin: dict.txt, train / valid .bin/.idx (--only-source)
    sentence_prediction_data(root)  root/bin/input0 (sentences) and root/bin/label (0 / 1)

Sentences are whitespace-tokenised words from a fixed vocabulary, drawn deterministically; the
label of a sentence is whether it holds more "good" than "bad" words, so it is learnable.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Tuple

WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()


def sentences(count: int, seed: int, min_words: int = 4, max_words: int = 30) -> List[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS + ["good", "bad"]) for _ in range(rng.randint(min_words, max_words)))
        for _ in range(count)
    ]


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def preprocess(destdir: Path, train: Path, valid: Path) -> Path:
    """fairseq-preprocess --only-source (dictionary built from the training text)."""
    cmd = [
        sys.executable, "-m", "fairseq_cli.preprocess",  # as fairseq-preprocess, also where no script is installed
        "--only-source",
        "--trainpref", str(train),
        "--validpref", str(valid),
        "--destdir", str(destdir),
        "--workers", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return destdir


def masked_lm_data(root: Path, train_lines: int = 160, valid_lines: int = 40) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train = write_lines(raw / "train.txt", sentences(train_lines, seed=1))
    valid = write_lines(raw / "valid.txt", sentences(valid_lines, seed=2))
    return preprocess(root / "bin", train, valid)


def _labelled(count: int, seed: int) -> Tuple[List[str], List[str]]:
    texts = sentences(count, seed)
    labels = [str(int(t.split().count("good") > t.split().count("bad"))) for t in texts]
    return texts, labels


def sentence_prediction_data(root: Path, train_lines: int = 96, valid_lines: int = 32) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_x, train_y = _labelled(train_lines, seed=3)
    valid_x, valid_y = _labelled(valid_lines, seed=4)
    out = root / "bin"
    preprocess(out / "input0", write_lines(raw / "train.input0", train_x), write_lines(raw / "valid.input0", valid_x))
    preprocess(out / "label", write_lines(raw / "train.label", train_y), write_lines(raw / "valid.label", valid_y))
    return out
