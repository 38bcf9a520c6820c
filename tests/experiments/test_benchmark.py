"""The attention benchmark program runs end to end and its numbers mean what its columns say.

Not a speed test: nothing here asserts a time. It runs the real program (fresh processes per
cell, as a user would) on a tiny grid and checks the CSV: every cell present, finite positive
times pooled over the timing processes, and error columns that tell exact from approximate
attention (i-clustered attention with topk >= L is exact; plain clustered attention with fewer
clusters than queries is not).
"""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "experiments" / "benchmarks" / "attention.py"


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(PROGRAM), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_benchmark_grid_writes_a_sane_csv(tmp_path):
    out = tmp_path / "bench.csv"
    done = run("--lengths", "70", "--clusters", "5", "--topk", "80", "--iterations", "3", "--repeats", "2",
               "--processes", "2", "--threads", "1", "--skew", "0.5", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    cells = {(int(r["length"]), r["impl"], r["pass"]) for r in rows}
    impls = ["sdpa", "ref-clustered", "ref-i-clustered", "clustered", "i-clustered"]
    assert cells == {(length, i, p) for length in (70,) for i in impls for p in ("fwd", "fwd+bwd")}
    assert not out.with_suffix(".csv.partial").exists()
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"])
        medians = [float(m) for m in r["process_medians_ms"].split(";")]  # two timing processes, pooled
        assert len(medians) == 2 and r["processes"] == "2"
        assert min(medians) - 1e-3 <= float(r["median_ms"]) <= max(medians) + 1e-3  # (written to the microsecond)
        assert math.isfinite(float(r["speedup_vs_sdpa"])) and float(r["peak_mem_mb"]) >= 0
        if r["pass"] != "fwd":
            assert r["err_iid"] == ""  # errors are measured on the forward pass only
            continue
        err = {kind: float(r[f"err_{kind}"]) for kind in ("iid", "structured")}
        if r["impl"] == "sdpa" or r["impl"].endswith("i-clustered"):  # topk 80 >= L: exact
            assert max(err.values()) < 1e-5, r
        else:  # 5 clusters for 70 queries: an approximation, visibly
            assert min(err.values()) > 1e-2, r
        if r["impl"] in ("clustered", "i-clustered"):
            assert 0 < float(r["clustering_ms"]) < float("inf")
    for r in rows:  # per-stage times of the compiled pipeline, from the profiler; the skew is recorded
        assert r["skew"] == "0.5"
        stages = dict(item.split("=") for item in r["stages_ms"].split(";")) if r["stages_ms"] else {}
        if r["impl"] in ("clustered", "i-clustered"):
            assert {"hash", "kmeans", "aggregate"} <= set(stages) and all(float(ms) > 0 for ms in stages.values()), r
        if r["impl"] == "i-clustered":
            assert {"centroid_topk", "topk_fwd"} <= set(stages) and ("topk_bwd" in stages) == (r["pass"] == "fwd+bwd")
        if r["impl"] not in ("clustered", "i-clustered"):
            assert not stages, r
    # the table on stdout has one line per cell, under the shape header
    assert "N=1 H=4 E=64 C=5 B=63 I=3 k=80 float32; median of 2 processes x 2; skew 0.5" in done.stdout
    assert sum(line.strip().startswith("70 ") for line in done.stdout.splitlines()) == len(rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_benchmark_without_cuda_says_so(tmp_path):
    done = run("--device", "cuda", "--lengths", "64", "--out", str(tmp_path / "x.csv"))
    assert done.returncode != 0
    assert "torch sees no CUDA device" in done.stderr
    assert not (tmp_path / "x.csv").exists()


def test_gemm_shapes_program_writes_its_table(tmp_path):
    """experiments/benchmarks/gemm_shapes.py: one row per product and length plus the square
    reference, positive times and rates; a bad flag is one clear line."""
    program = ROOT / "experiments" / "benchmarks" / "gemm_shapes.py"
    out = tmp_path / "gemm.csv"
    args = ["--lengths", "64", "200", "--square", "128", "--repeats", "2", "--threads", "1", "--out", str(out)]
    done = subprocess.run([sys.executable, str(program), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["product"], r["length"]) for r in rows] == [("square 128^3", "")] + [
        (p, str(length)) for length in (64, 200) for p in ("hash x @ planesᵀ", "scores Q_c @ Kᵀ", "A^c @ V")
    ]
    assert all(float(r["ms"]) > 0 and float(r["gflops"]) > 0 for r in rows)
    assert float(rows[0]["of_square"]) == 1.0
    bad = subprocess.run([sys.executable, str(program), "--lengths", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lengths must be >= 1" in bad.stderr
