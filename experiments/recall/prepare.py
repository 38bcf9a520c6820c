"""The data directory of the recall sweeps: only the task's dictionary.

``--task associative_recall`` generates its sequences and reads no data, but the sweep launcher
wants a data directory holding a ``dict.txt`` (slurm/spec.py). This writes the dictionary the task
builds for a vocabulary size, so the directory also documents the symbols (k* keys, v* values,
``_`` blank, n* noise).

    python -m experiments.recall.prepare --out outputs/recall/data [--vocab-size 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write dict.txt into")
    parser.add_argument("--vocab-size", type=int, default=256, help="the task's --vocab-size (default: 256)")
    args = parser.parse_args(argv)

    from fairseq_plugin.tasks.associative_recall import AssociativeRecallConfig, AssociativeRecallTask

    cfg = AssociativeRecallConfig(vocab_size=args.vocab_size, num_pairs=1, num_queries=1, tokens_per_sample=5)
    task = AssociativeRecallTask.setup_task(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    task.dictionary.save(str(args.out / "dict.txt"))
    print(f"wrote {args.out / 'dict.txt'} ({len(task.dictionary)} symbols)")
    return args.out


if __name__ == "__main__":
    main()
