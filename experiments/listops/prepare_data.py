"""ListOps as a fairseq ``sentence_prediction`` data directory (10 classes).

Generates the splits with :mod:`experiments.listops.generate` and binarises them with the real
``fairseq-preprocess``, the way experiments/hardmax/prepare_data.py does. Output under ``--out``:

    input0/{dict.txt,train,valid,test}.{bin,idx}   tokens ([MAX ... ] and digits, 18 symbols)
    label/{dict.txt,train,valid,test}.{bin,idx}    the answer digit
    dict.txt (a copy of input0's, what the sweep launcher looks for)   raw/   prepare.json

A rerun with the same settings does nothing; the directory is written complete or not at all.

    python -m experiments.listops.prepare_data --out outputs/listops/data               # LRA sizes
    python -m experiments.listops.prepare_data --out /tmp/lo --train 64 --valid 16 --test 16 \
        --min-length 20 --max-length 100 --max-depth 4                                  # a tiny one
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from experiments.listops import generate

BIN = Path(sys.executable).parent
SPLITS = tuple(generate.SPLIT_SEEDS)


def log(message: str) -> None:
    print(f"[listops-data] {message}", file=sys.stderr, flush=True)


def settings_of(args: argparse.Namespace) -> dict:
    spec = generate.spec_of(args)
    return {"spec": {k: getattr(spec, k) for k in ("max_depth", "max_args", "min_length", "max_length", "branch")},
            "sizes": {s: getattr(args, s) for s in SPLITS}, "seed": args.seed}  # fmt: skip


def up_to_date(out: Path, settings: dict) -> bool:
    try:
        done = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError):
        return False
    files = [out / "dict.txt"] + [out / k / f"{s}.{e}" for k in ("input0", "label") for s in SPLITS for e in ("bin", "idx")]
    return done.get("settings") == settings and all(f.is_file() for f in files)


def preprocess(destdir: Path, raw: Path, suffix: str, srcdict: Optional[Path] = None) -> None:
    cmd = [str(BIN / "fairseq-preprocess"), "--only-source", "--destdir", str(destdir), "--workers", "1",
           *(arg for split in SPLITS for arg in (f"--{split}pref", str(raw / f"{split}.{suffix}")))]  # fmt: skip
    if srcdict is not None:
        cmd += ["--srcdict", str(srcdict)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        sys.exit(f"error: fairseq-preprocess ({suffix}) failed with exit {done.returncode}: {tail[0]}")


def prepare(out: Path, args: argparse.Namespace, settings: dict) -> dict:
    started = time.time()
    spec = generate.spec_of(args)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    raw = stage / "raw"
    raw.mkdir(parents=True)
    counts = {}
    for split, seed in generate.SPLIT_SEEDS.items():
        labels, lengths = [], []
        with (raw / f"{split}.input0").open("w") as text, (raw / f"{split}.label").open("w") as label:
            for index in range(getattr(args, split)):
                answer, toks = generate.example(spec, args.seed * 100 + seed, index)
                text.write(" ".join(toks) + "\n")
                label.write(f"{answer}\n")
                labels.append(answer)
                lengths.append(len(toks))
        counts[split] = {"expressions": len(labels), "labels": [labels.count(c) for c in range(10)],
                         "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1), "max_tokens": max(lengths, default=0)}  # fmt: skip
        log(f"{split}: {counts[split]}")
    preprocess(stage / "input0", raw, "input0")
    classes = raw / "label.dict.txt"  # all 10 classes, in order, even those a small train split lacks
    classes.write_text("".join(f"{c} 1\n" for c in range(10)))
    preprocess(stage / "label", raw, "label", srcdict=classes)
    shutil.copyfile(stage / "input0" / "dict.txt", stage / "dict.txt")
    stamp = {"settings": settings, "splits": counts, "seconds": round(time.time() - started, 1)}
    (stage / "prepare.json").write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(stage, out)  # complete or absent
    log(f"wrote {out} in {stamp['seconds']} s")
    return stamp


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/listops/data"))
    generate.add_args(parser)
    args = parser.parse_args(argv)
    if not (BIN / "fairseq-preprocess").is_file():
        sys.exit(f"error: {BIN / 'fairseq-preprocess'} not found; install fairseq in this environment (scripts/setup.sh)")
    settings = settings_of(args)
    out = args.out.resolve()
    if up_to_date(out, settings):
        log(f"{out} is up to date (prepare.json matches); nothing to do")
        return
    prepare(out, args, settings)


if __name__ == "__main__":
    main()
