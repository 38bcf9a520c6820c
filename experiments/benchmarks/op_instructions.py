"""Instruction counts of the compiled CPU ops, one call each, under valgrind's callgrind.

Wall time on a shared VM moves by up to 2x over a day; instruction counts do not depend on the
load, so they are how a kernel change is judged here before it is timed (docs/results.md §4.1).
valgrind's CPU offers AVX2 but not AVX-512, so this counts the AVX2 variants (and, for ATen's
own kernels, whatever ATen picks on that CPU). One thread.

    python experiments/benchmarks/op_instructions.py --lengths 1024 8192 --out counts.csv

prints one row per (op, L): the instructions executed inside the op's C++ entry point and
everything it calls, its at::parallel_for tasks included (callgrind ``--toggle-collect`` on the
entry point's exact name: a glob that also matched the lambdas inside it would toggle collection
off again within them), and writes them as CSV. The op runs once in its process (inputs that other
ops produce are made on demand), so the count is one call's. Needs ``valgrind`` on the PATH.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# op -> the C++ entry point whose inclusive cost is counted (csrc/cpu/*.cpp)
ENTRY = {
    "lsh_hash": "fca::lsh_hash_cpu",
    "hamming_kmeans": "fca::hamming_kmeans_cpu",
    "cluster_sum": "fca::cluster_sum_cpu",
    "cluster_combine": "fca::cluster_combine_cpu",
    "softmax_topk": "fca::softmax_topk_cpu",
    "topk_attention": "fca::topk_attention_cpu",
    "topk_attention_backward": "fca::topk_attention_backward_cpu",
}

# One call of one op on the benchmark's shapes (N=1 H=4 E=64 C=100 B=63 I=10 k=32), inputs built
# outside the counted function; run in the child that valgrind starts.
CHILD = r"""
import functools, sys, torch
torch.set_num_threads(1)
from fairseq_plugin.ops import compiled
from fairseq_plugin.ops.hashing import draw_planes
from fairseq_plugin.ops.kmeans import draw_kmeans_seeds
assert compiled.load(), compiled.load_error()
op, length = sys.argv[1], int(sys.argv[2])
OPS = torch.ops.fairseq_clustered
g = torch.Generator().manual_seed(0)
n, h, e, c, bits, iters, kk = 1, 4, 64, 100, 63, 10, 32
q, k, v = (torch.randn(n, h, length, e, generator=g) for _ in range(3))
planes = draw_planes(bits, e, True, g)
init, reseed = draw_kmeans_seeds(n, h, length, c, iters, torch.zeros(n, length, dtype=torch.bool), g, q.device)
scores = torch.randn(n, h, c, length, generator=g)
mass, rest = torch.rand(n, h, c, generator=g), torch.randn(n, h, c, e, generator=g)
# Inputs that come from other ops are made on demand, so that the counted op runs exactly once
# (callgrind counts every call of the entry point: a setup call of the op itself would double it).
cached = functools.lru_cache(maxsize=None)
codes = cached(lambda: OPS.lsh_hash(q, planes))
assignment = cached(lambda: OPS.hamming_kmeans(codes(), init, reseed, None, bits)[0])
top = cached(lambda: OPS.softmax_topk(scores, None, kk)[1])
top_out = cached(lambda: OPS.topk_attention(q, k, v, assignment(), top(), None, 0.125))
calls = {
    "lsh_hash": lambda: OPS.lsh_hash(q, planes),
    "hamming_kmeans": lambda: OPS.hamming_kmeans(codes(), init, reseed, None, bits),
    "cluster_sum": lambda: OPS.cluster_sum(q, assignment(), c),
    "cluster_combine": lambda: OPS.cluster_combine(top_out()[0], mass, rest, assignment()),
    "softmax_topk": lambda: OPS.softmax_topk(scores, None, kk),
    "topk_attention": lambda: OPS.topk_attention(q, k, v, assignment(), top(), None, 0.125),
    "topk_attention_backward": lambda: OPS.topk_attention_backward(
        torch.ones_like(top_out()[0]), q, k, v, assignment(), top(), top_out()[1], 0.125),
}
calls[op]()
"""


def count(op: str, length: int, repo: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--toggle-collect={ENTRY[op]}(*)",
               sys.executable, "-c", CHILD, op, str(length)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"callgrind failed for {op} at L={length}:\n{done.stderr[-2000:]}")
        summary = re.search(r"^summary:\s*(\d+)", out.read_text(), re.MULTILINE)
        if summary is None:
            raise SystemExit(f"no summary line in callgrind's output for {op} at L={length}")
        return int(summary.group(1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--ops", nargs="+", choices=sorted(ENTRY), default=list(ENTRY))
    parser.add_argument("--out", type=Path, help="CSV file to write (op, length, instructions)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on the PATH (Debian: apt install valgrind)")
    repo = Path(__file__).resolve().parents[2]
    rows = []
    print(f"{'op':<26} {'L':>6} {'instructions':>14}", flush=True)
    for op in args.ops:
        for length in args.lengths:
            n = count(op, length, repo)
            rows.append({"op": op, "length": length, "instructions": n})
            print(f"{op:<26} {length:>6} {n / 1e6:>13.2f}M", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["op", "length", "instructions"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
