"""The ahead-of-time compile check (experiments/benchmarks/compile_kernels.py) passes, and covers
every kernel file of fairseq_plugin/ops/triton/.

To stay within two minutes on 2 cores it compiles ``--sample`` (the last, usually the largest,
configuration of every kernel) with the venv's triton for sm_80 and sm_90, which the kernels are
tuned for, and for sm_86 (Ampere's consumer and workstation cards: 99 KB of shared memory a block),
sm_100 (B200: tcgen05) and sm_120 (consumer Blackwell), which the dispatcher also serves;
test_triton_compat.py runs the full sm_80 / sm_90 grid with triton 3.6, and the program itself runs
any grid with any triton.
It runs in a subprocess and this process never imports triton (the interpreter tests need to
choose the interpreter before triton is imported).
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "experiments" / "benchmarks" / "compile_kernels.py"
KERNEL_DIR = ROOT / "fairseq_plugin" / "ops" / "triton"
ARCHES = ["sm_80", "sm_90", "sm_86", "sm_100", "sm_120"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_compile_kernels_sample(tmp_path):
    out = tmp_path / "compile.csv"
    run = subprocess.run(
        [sys.executable, str(PROGRAM), "--arch", ",".join(ARCHES), "--sample", "--jobs", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    failures = [line for line in run.stderr.splitlines() if line.startswith("FAIL") or "Error" in line]
    assert run.returncode == 0, "\n".join(failures[-20:]) or run.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    files = {p.stem for p in KERNEL_DIR.glob("*.py") if not p.name.startswith("_")}
    assert files, "no kernel files found"
    seen = {row["kernel"].split(".")[0] for row in rows}
    assert seen == files, f"kernel files without compiled configurations: {sorted(files - seen)}"
    assert {row["arch"] for row in rows} == set(ARCHES)
    assert all(row["status"] == "ok" for row in rows)
    assert all(row["tile"] != "none" for row in rows)
    assert all(row["spill_bytes"] == "0" for row in rows if row["arch"] in ("sm_80", "sm_90"))
    # static SASS sizes, which docs/gpu.md's estimates multiply by trip counts: every kernel has some,
    # and the k-means assign pass has its distance loop and its per-chunk loop
    assert all(int(row["sass"]) > 0 for row in rows)
    assign = [row for row in rows if row["kernel"] == "kmeans._assign_kernel"]
    assert assign and all(len(row["loops"].split(";")) >= 2 for row in assign), assign
