"""ListOps expressions (Nangia & Bowman 2018) in the Long Range Arena setting, from a seed.

Written from the published description (DESIGN.md §7), not from either project's code:
nested prefix expressions over the digits 0-9 with four operators,

    MIN, MAX   the smallest / largest argument
    MED        the median (of an even count: the mean of the two middle values, rounded down)
    SM         the sum modulo 10 (LRA's SUM_MOD)

written as tokens ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (= 9), so the answer, one of 10 classes, is the digit
the expression evaluates to. LRA's settings are the defaults: depth at most 10 (the number of nested
operators on the longest path), at most 10 arguments per operator, at most 2,000 tokens; LRA's
sequences are long (its generator keeps lengths from 500 up), here ``--min-length``.

A tree grows top-down: an argument is an operator with probability ``branch`` (never at the maximal
depth), otherwise a digit; an operator takes 2 to ``max_args`` arguments. Trees outside the length
window are drawn again. Example ``i`` of a split depends on ``(seed, i)`` only.

    python -m experiments.listops.generate --out DIR [--train 96000 --valid 2000 --test 2000]
        # DIR/{train,valid,test}.tsv: "label<TAB>tokens" per line
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union

OPERATORS = ("MIN", "MAX", "MED", "SM")
Tree = Union[int, Tuple[str, list]]


@dataclass(frozen=True)
class ListOpsSpec:
    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    branch: float = 0.25  # probability that an argument is itself an operator (below max_depth)
    max_tries: int = 10000  # draws per example before giving up (a window that cannot be hit)

    def problems(self) -> List[str]:
        out = []
        if self.max_depth < 1:
            out.append(f"--max-depth must be >= 1, got {self.max_depth}")
        if self.max_args < 2:
            out.append(f"--max-args must be >= 2, got {self.max_args}")
        if self.min_length < 4 or self.max_length < self.min_length:
            out.append(f"need 4 <= --min-length <= --max-length, got {self.min_length} and {self.max_length}")
        if not 0 < self.branch < 1:
            out.append(f"--branch must be in (0, 1), got {self.branch}")
        return out


def evaluate(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [evaluate(a) for a in args]
    if op == "MIN":
        return min(values)
    if op == "MAX":
        return max(values)
    if op == "MED":
        return int(statistics.median(values))  # digits >= 0: int() rounds the .5 of an even count down
    return sum(values) % 10  # SM


def tokens(tree: Tree) -> List[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    return [f"[{op}", *(t for a in args for t in tokens(a)), "]"]


def depth(tree: Tree) -> int:
    return 0 if isinstance(tree, int) else 1 + max(depth(a) for a in tree[1])


def _grow(rng: random.Random, spec: ListOpsSpec, level: int, budget: List[int]) -> Tree:
    """An operator at nesting ``level`` (1 = the root). ``budget``: tokens still allowed; a tree that
    runs out is cut short (its caller discards it)."""
    budget[0] -= 2  # "[OP" and "]"
    args: list = []
    for _ in range(rng.randint(2, spec.max_args)):
        if budget[0] <= 0:
            budget[0] = -1  # out of tokens with arguments to go: the tree is discarded
            break
        if level < spec.max_depth and rng.random() < spec.branch:
            args.append(_grow(rng, spec, level + 1, budget))
        else:
            budget[0] -= 1
            args.append(rng.randrange(10))
    return (rng.choice(OPERATORS), args)


def example(spec: ListOpsSpec, seed: int, index: int) -> Tuple[int, List[str]]:
    """(label, tokens) of example ``index`` of the stream ``seed``."""
    rng = random.Random(f"listops/{seed}/{index}")
    for _ in range(spec.max_tries):
        budget = [spec.max_length]
        tree = _grow(rng, spec, 1, budget)
        if budget[0] < 0:
            continue
        toks = tokens(tree)
        if spec.min_length <= len(toks) <= spec.max_length:
            return evaluate(tree), toks
    raise ValueError(f"no expression of {spec.min_length}..{spec.max_length} tokens in {spec.max_tries} draws "
                     f"(raise --branch or widen the length window)")  # fmt: skip


def write_split(path: Path, spec: ListOpsSpec, seed: int, count: int) -> List[int]:
    labels = []
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            label, toks = example(spec, seed, index)
            labels.append(label)
            handle.write(f"{label}\t{' '.join(toks)}\n")
    return labels


SPLIT_SEEDS = {"train": 1, "valid": 2, "test": 3}


def add_args(parser: argparse.ArgumentParser) -> None:
    defaults = ListOpsSpec()
    parser.add_argument("--max-depth", type=int, default=defaults.max_depth, help="nested operators at most (LRA: 10)")
    parser.add_argument("--max-args", type=int, default=defaults.max_args, help="arguments per operator at most (LRA: 10)")
    parser.add_argument("--min-length", type=int, default=defaults.min_length, help="tokens at least")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens at most (LRA: 2000)")
    parser.add_argument("--branch", type=float, default=defaults.branch, help="probability that an argument is an operator")
    for split, count in (("train", 96000), ("valid", 2000), ("test", 2000)):
        parser.add_argument(f"--{split}", type=int, default=count, metavar="N", help=f"{split} examples (default {count})")
    parser.add_argument("--seed", type=int, default=0, help="added to the fixed per-split seeds")


def spec_of(args: argparse.Namespace) -> ListOpsSpec:
    spec = ListOpsSpec(max_depth=args.max_depth, max_args=args.max_args, min_length=args.min_length,
                       max_length=args.max_length, branch=args.branch)  # fmt: skip
    if spec.problems():
        sys.exit(f"error: {spec.problems()[0]}")
    return spec


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    add_args(parser)
    args = parser.parse_args(argv)
    spec = spec_of(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, seed in SPLIT_SEEDS.items():
        labels = write_split(args.out / f"{split}.tsv", spec, args.seed * 100 + seed, getattr(args, split))
        counts = [labels.count(c) for c in range(10)]
        print(f"{split}: {len(labels)} expressions, labels 0-9: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
