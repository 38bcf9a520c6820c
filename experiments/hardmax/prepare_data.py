"""Rotten Tomatoes sentences as a fairseq ``sentence_prediction`` dataset for the hardmax experiment.

Rows from ``experiments/sentiment_data.py`` (``load("movie")``, ``binary_split(rows, seed)``: label =
sign of the human score, zeros dropped, fixed 80/10/10 split), lower-cased and cut into words
(letters and digits, with inner apostrophes: ``isn't``; punctuation dropped), then ``fairseq-preprocess``
of ``input0`` (dictionary from the training words, words seen fewer than ``--threshold`` times -> <unk>)
and ``label``. Output under ``--out``:

    input0/{dict.txt,train,valid,test}.{bin,idx}   label/{dict.txt,...}   raw/   prepare.json
    dict.txt   a copy of input0/dict.txt: the sweep launcher checks data.path/dict.txt

A rerun with the same settings does nothing ("up to date"); other settings rebuild the folder.
``--limit-train/valid/test N`` keep the first N rows of a split (the reduced test uses them).

    python -m experiments.hardmax.prepare_data --out outputs/hardmax/data
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
SPLITS = ("train", "valid", "test")
BIN = Path(sys.executable).parent


def log(message: str) -> None:
    print(f"[hardmax-data] {message}", file=sys.stderr, flush=True)


def tokenize(text: str) -> List[str]:
    """Lower-cased words; punctuation is dropped (``it's`` and ``n't`` forms stay one word)."""
    return WORD.findall(text.lower())


def settings_of(args: argparse.Namespace) -> dict:
    return {"corpus": "movie", "split_seed": args.seed, "threshold": args.threshold,
            "limits": {s: getattr(args, f"limit_{s}") for s in SPLITS}, "tokenizer": WORD.pattern}  # fmt: skip


def up_to_date(out: Path, settings: dict) -> bool:
    try:
        done = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError):
        return False
    files = [out / "dict.txt", out / "label" / "dict.txt"]
    files += [out / kind / f"{split}.{ext}" for kind in ("input0", "label") for split in SPLITS for ext in ("bin", "idx")]
    return done.get("settings") == settings and all(f.is_file() for f in files)


def split_rows(seed: int, limits: Dict[str, Optional[int]]) -> Dict[str, List[Tuple[List[str], int]]]:
    from experiments.sentiment_data import SentimentDataError, binary_split, load

    try:
        rows = load("movie")
    except SentimentDataError as err:
        sys.exit(f"error: {err}")
    parts = binary_split(rows, seed=seed)
    out = {}
    for split in SPLITS:
        items = [(tokenize(text), label) for text, label in parts[split]]
        empty = sum(1 for words, _ in items if not words)
        if empty:
            log(f"{split}: dropping {empty} sentences with no word")
        items = [(words, label) for words, label in items if words]
        out[split] = items[: limits[split]] if limits[split] is not None else items
    return out


def preprocess(destdir: Path, raw: Path, suffix: str, threshold: int) -> None:
    cmd = [str(BIN / "fairseq-preprocess"), "--only-source", "--destdir", str(destdir), "--workers", "1",
           "--thresholdsrc", str(threshold),
           *(arg for split in SPLITS for arg in (f"--{split}pref", str(raw / f"{split}.{suffix}")))]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        sys.exit(f"error: fairseq-preprocess ({suffix}) failed with exit {done.returncode}: {tail[0]}")


def prepare(out: Path, settings: dict) -> dict:
    started = time.time()
    log("reading Rotten Tomatoes sentences (experiments/sentiment_data.py, movie)")
    parts = split_rows(settings["split_seed"], settings["limits"])
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    raw = stage / "raw"
    raw.mkdir(parents=True)
    counts = {}
    for split, items in parts.items():
        (raw / f"{split}.input0").write_text("".join(" ".join(w) + "\n" for w, _ in items), encoding="utf-8")
        (raw / f"{split}.label").write_text("".join(f"{label}\n" for _, label in items), encoding="utf-8")
        positive = sum(label for _, label in items)
        counts[split] = {"sentences": len(items), "positive": positive,
                         "mean_words": round(sum(len(w) for w, _ in items) / max(len(items), 1), 2)}  # fmt: skip
        log(f"{split}: {len(items)} sentences, {positive / max(len(items), 1):.1%} positive, "
            f"{counts[split]['mean_words']} words on average")  # fmt: skip
    log("fairseq-preprocess input0 (words)")
    preprocess(stage / "input0", raw, "input0", settings["threshold"])
    log("fairseq-preprocess label")
    preprocess(stage / "label", raw, "label", 0)
    shutil.copyfile(stage / "input0" / "dict.txt", stage / "dict.txt")
    vocab = sum(1 for _ in (stage / "input0" / "dict.txt").open(encoding="utf-8"))
    stamp = {"settings": settings, "splits": counts, "vocabulary": vocab, "seconds": round(time.time() - started, 1),
             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    (stage / "prepare.json").write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(stage, out)  # complete or absent
    log(f"wrote {out} ({vocab} words in the dictionary besides the special symbols) in {stamp['seconds']} s")
    return stamp


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/hardmax/data"))
    parser.add_argument("--seed", type=int, default=0, help="seed of binary_split (the fixed split is seed 0)")
    parser.add_argument("--threshold", type=int, default=2, help="words seen fewer times in train become <unk>")
    for split in SPLITS:
        parser.add_argument(f"--limit-{split}", type=int, default=None, metavar="N", help=f"keep the first N {split} rows")
    args = parser.parse_args(argv)
    if not (BIN / "fairseq-preprocess").is_file():
        sys.exit(f"error: {BIN / 'fairseq-preprocess'} not found; install fairseq in this environment (scripts/setup.sh)")
    settings = settings_of(args)
    out = args.out.resolve()
    if up_to_date(out, settings):
        log(f"{out} is up to date (prepare.json matches); nothing to do")
        return
    prepare(out, settings)


if __name__ == "__main__":
    main()
