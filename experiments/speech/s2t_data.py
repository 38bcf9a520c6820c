"""The speech_to_text data directory the ``*_ctc`` models train on, written from any audio source.

Layout (fairseq's speech_to_text, with a character vocabulary as fairseq_plugin/models/speech_ctc.py
expects):

    DIR/config.yaml       input_feat_per_channel: 80, vocab_filename: dict.txt, audio_root: '',
                          feature_transforms: utterance_cmvn (per-utterance mean/variance normalisation)
    DIR/dict.txt          one unit a line with its count in the train split: a-z, ' and |, the word boundary
    DIR/<split>.tsv       id, audio (absolute path of a .npy), n_frames, tgt_text ("t w o | s i x"), speaker
    DIR/feats/<split>/<id>.npy   float32 (n_frames, 80) Kaldi-style log-mel filterbanks (fbank.py)
    DIR/prepare.json      what made the directory (arguments, counts, time); a rerun with the same
                          arguments and every file present does nothing

Transcripts are normalised to lower-case letters, apostrophes and single spaces (:func:`normalize`);
every character is one CTC unit and ``|`` separates words, so ``--post-process letter`` turns units
back into words and fairseq's ``uer`` is the character error rate (the space counted as ``|``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .fbank import NUM_MEL_BINS, SAMPLE_RATE, fbank

WORD_BOUNDARY = "|"
MANIFEST_FIELDS = ["id", "audio", "n_frames", "tgt_text", "speaker"]
_NOT_TEXT = re.compile(r"[^a-z' ]+")


class DataError(RuntimeError):
    """Input data missing or malformed; the message is one line saying what to do."""


def normalize(text: str) -> str:
    """``"Don't -- STOP!  Now"`` -> ``"don't stop now"``: lower case, a-z and ', single spaces."""
    text = text.lower().replace("-", " ")
    words = (w.strip("'") for w in _NOT_TEXT.sub(" ", text).split())
    return " ".join(w for w in words if w)


def units(sentence: str) -> str:
    """``"two six"`` -> ``"t w o | s i x"``: the ``tgt_text`` form of a transcript."""
    return f" {WORD_BOUNDARY} ".join(" ".join(word) for word in sentence.split())


def features(samples: np.ndarray) -> np.ndarray:
    """(n_frames, 80) float32 log-mel filterbanks of 16 kHz mono samples in 16-bit units."""
    return fbank(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), SAMPLE_RATE).numpy()


def read_wav(path: Path) -> np.ndarray:
    """16-bit PCM mono 16 kHz WAV -> int16 samples (the standard library's reader, no extra package)."""
    with wave.open(str(path), "rb") as handle:
        if handle.getsampwidth() != 2 or handle.getnchannels() != 1 or handle.getframerate() != SAMPLE_RATE:
            raise DataError(f"{path}: expected 16-bit mono {SAMPLE_RATE} Hz PCM; convert it with "
                            f"'sox IN -r {SAMPLE_RATE} -c 1 -b 16 OUT.wav'")  # fmt: skip
        return np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)


def save_features(path: Path, feats: np.ndarray) -> None:
    """Atomic np.save: an interrupted run never leaves a truncated .npy behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, feats.astype(np.float32, copy=False))
    os.replace(tmp, path)


def saved_frames(path: Path) -> int | None:
    """Frames of an existing feature file (header only), None when it is absent or unreadable."""
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return None


def write_manifest(path: Path, rows: Iterable[dict]) -> int:
    rows = list(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, delimiter="\t", quoting=csv.QUOTE_NONE,
                                lineterminator="\n", extrasaction="ignore")  # fmt: skip
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return len(rows)


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_dictionary(path: Path, transcripts: Iterable[str]) -> list[str]:
    """dict.txt from the training transcripts: every character and ``|``, most frequent first."""
    counts: Counter = Counter()
    for text in transcripts:
        counts.update(units(text).split())
    if not counts:
        raise DataError(f"{path}: no training transcripts to build a vocabulary from")
    ordered = sorted(counts, key=lambda u: (-counts[u], u))
    path.write_text("".join(f"{unit} {counts[unit]}\n" for unit in ordered))
    return ordered


def write_config(root: Path, vocab: str = "dict.txt") -> Path:
    path = root / "config.yaml"
    path.write_text(
        f"input_feat_per_channel: {NUM_MEL_BINS}\ninput_channels: 1\nvocab_filename: {vocab}\naudio_root: ''\n"
        "feature_transforms:\n  '*': [utterance_cmvn]\n"
    )
    return path


def is_prepared(root: Path, settings: dict, splits: Iterable[str]) -> bool:
    """True when ``root`` was completed with the same settings and its manifests and features exist."""
    stamp = root / "prepare.json"
    try:
        done = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if done.get("settings") != settings or not (root / "dict.txt").is_file() or not (root / "config.yaml").is_file():
        return False
    for split in splits:
        manifest = root / f"{split}.tsv"
        if not manifest.is_file():
            return False
        if not all(Path(row["audio"]).is_file() for row in read_manifest(manifest)):
            return False
    return True


def write_stamp(root: Path, settings: dict, counts: dict, started: float) -> None:
    stamp = {"settings": settings, "utterances": counts, "seconds": round(time.time() - started, 1),
             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    (root / "prepare.json").write_text(json.dumps(stamp, indent=1) + "\n")


class Progress:
    """One line every ``every`` seconds: ``[tag] split 1200/4000 (35.1/s, eta 80 s)``."""

    def __init__(self, tag: str, label: str, total: int, every: float = 5.0):
        self.tag, self.label, self.total, self.every = tag, label, total, every
        self.start = self.last = time.time()
        self.done = 0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done == self.total:
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"[{self.tag}] {self.label} {self.done}/{self.total} ({rate:.1f}/s, eta {eta:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.last = now


def extract(pool, make, jobs: list, tag: str, label: str, chunksize: int = 16) -> dict[str, int]:
    """Run ``make`` (a job -> (utterance id, frames)) over ``jobs`` in ``pool``, with progress lines;
    returns the frames of every utterance."""
    frames: dict[str, int] = {}
    progress = Progress(tag, label, len(jobs))
    for utt, n in pool.imap_unordered(make, jobs, chunksize=chunksize):
        frames[utt] = n
        progress.step()
    return frames


def finish(out: Path, tag: str, settings: dict, counts: dict, train_texts: Iterable[str], started: float) -> Path:
    """The files beside the manifests: dict.txt from the train transcripts, config.yaml and the
    stamp that makes a rerun with the same settings a no-op."""
    write_dictionary(out / "dict.txt", train_texts)
    write_config(out)
    write_stamp(out, settings, counts, started)
    print(f"[{tag}] wrote {out} in {time.time() - started:.0f} s", file=sys.stderr)
    return out
