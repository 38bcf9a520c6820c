"""tests/ops/gpu_checks.py's ``topk`` check runs in Triton's interpreter (GPU_CHECKS_DEVICE=cpu), so
that the GPU acceptance script's newest step cannot fail on a GPU day for a reason a CPU could have
shown. About 10 s; the other checks need CUDA (graphs, sync-debug mode, the sanitizer)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_in_interpreter(check: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_CHECKS_DEVICE="cpu", TRITON_INTERPRET="1", FAIRSEQ_PLUGIN_TRITON_ON_CPU="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "ops" / "gpu_checks.py"), check, str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=out)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_topk_check_runs_in_the_interpreter(tmp_path):
    run = _run_in_interpreter("topk", tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    record = json.loads((tmp_path / "topk.json").read_text())
    assert record["status"] == "PASS" and "interpreter" in record["device"]
    cases = [key for key in record if key.startswith("L=")]
    assert len(cases) == 2 and all(0.0 <= record[key]["threshold_rows"] <= 1.0 for key in cases)


def test_interpreter_refuses_the_cuda_only_checks(tmp_path):
    run = _run_in_interpreter("graph", tmp_path)
    assert run.returncode == 1 and "runs topk in Triton's interpreter only" in run.stdout
