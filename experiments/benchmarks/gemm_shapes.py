"""The BLAS products of the i-clustered forward, timed alone against a square sgemm in one process.

On CPU about half of the compiled i-clustered forward is three ATen matrix products (the hashing
GEMM, the centroid scores Q_c Kᵀ and A^c V, docs/results.md §4.1), and how close the BLAS gets to
its own peak on these short-E shapes decides much of the end-to-end speed. This program times each
product at the benchmark's shapes (N=1 H=4 E=64 C=100 B=63, padded to 64 planes as lsh_hash does)
and a square product, and prints GFLOP/s and the fraction of the square one:

    python experiments/benchmarks/gemm_shapes.py --lengths 1024 8192 --threads 2 --out gemm.csv

Median of ``--repeats`` calls after a warm-up, outputs allocated by each call as in the forward.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Callable, Dict, List

from attention import timed  # the attention benchmark's warm-up + timed calls (this folder is on sys.path)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(timed(fn, "cpu", repeats))


def products(length: int, heads: int, dim: int, clusters: int, planes: int) -> Dict[str, tuple]:
    """name -> (callable, FLOPs) of each product at one length."""
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=g) for _ in range(3))
    weights = torch.randn(planes, dim, generator=g)
    centroids = torch.randn(1, heads, clusters, dim, generator=g)
    attn = torch.softmax(torch.randn(1, heads, clusters, length, generator=g), -1)
    return {
        "hash x @ planesᵀ": (lambda: torch.matmul(q, weights.t()), 2 * heads * length * dim * planes),
        "scores Q_c @ Kᵀ": (lambda: centroids @ k.transpose(-1, -2), 2 * heads * clusters * length * dim),
        "A^c @ V": (lambda: attn @ v, 2 * heads * clusters * length * dim),
    }


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--planes", type=int, default=64, help="hash planes, padded (63 bits -> 64)")
    parser.add_argument("--square", type=int, default=2048, help="size of the square sgemm reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, help="CSV file to write")
    args = parser.parse_args(argv)
    for name in ("lengths", "heads", "dim", "clusters", "planes", "square", "threads", "repeats"):
        values = getattr(args, name) if name == "lengths" else [getattr(args, name)]
        if any(x < 1 for x in values):
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    import torch

    torch.set_num_threads(args.threads)
    a, b = torch.randn(args.square, args.square), torch.randn(args.square, args.square)
    square_ms = median_ms(lambda: a @ b, max(3, args.repeats // 3))
    square = 2 * args.square**3 / square_ms / 1e6
    rows = [{"product": f"square {args.square}^3", "length": "", "ms": round(square_ms, 3),
             "gflops": round(square, 1), "of_square": 1.0}]  # fmt: skip
    for length in args.lengths:
        for name, (fn, flops) in products(length, args.heads, args.dim, args.clusters, args.planes).items():
            ms = median_ms(fn, args.repeats)
            gflops = flops / ms / 1e6
            rows.append({"product": name, "length": length, "ms": round(ms, 3), "gflops": round(gflops, 1),
                         "of_square": round(gflops / square, 2)})  # fmt: skip
    print(f"# torch {torch.__version__}, {args.threads} threads, H={args.heads} E={args.dim} C={args.clusters} "
          f"planes={args.planes}; median of {args.repeats}")  # fmt: skip
    print(f"{'product':<20} {'L':>6} {'ms':>9} {'GFLOP/s':>8} {'of square':>9}")
    for row in rows:
        print(f"{row['product']:<20} {row['length']!s:>6} {row['ms']:>9.3f} {row['gflops']:>8.1f} {row['of_square']:>9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
