"""The GPU acceptance run, checked without a GPU, so that it cannot fail on a GPU day for a reason a
CPU could have shown: tests/ops/gpu_checks.py's ``topk`` and ``nan`` checks in Triton's interpreter
(GPU_CHECKS_DEVICE=cpu, under tests/ops/hostile.py; about 10 s and 25 s; ``tiny`` runs there too but
asserts nothing of its own, and the other checks need CUDA: graphs, sync-debug mode, the sanitizer),
and scripts/gpu_check.sh's time budget, archive and argument errors (about 10 s)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_nan_check_runs_in_the_interpreter(tmp_path):
    """The NaN / inf check's own logic (a NaN query poisons exactly its cluster, an inf key reaches
    the output as NaN), at L = 64 and 6 clusters instead of 512 and 20. It fails, for one, when the
    cluster sums drop non-finite values (checked by mutation)."""
    run = _run_in_interpreter("nan", tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    record = json.loads((tmp_path / "nan.json").read_text())
    assert record["status"] == "PASS" and record["cluster_size_of_nan_query"] >= 2, record


def test_interpreter_refuses_the_cuda_only_checks(tmp_path):
    run = _run_in_interpreter("graph", tmp_path)
    assert run.returncode == 1 and "runs nan, tiny, topk in Triton's interpreter only" in run.stdout


def _gpu_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=120, cwd=out.parent, env=dict(os.environ, PYTHON=sys.executable, **env))


def test_gpu_check_script_keeps_to_its_budget_and_archives_what_ran(tmp_path):
    """The acceptance script's bookkeeping, here where every CUDA step fails at once: with BUDGET_S=42
    the environment step runs (and fails: no CUDA), the steps the budget cannot hold are recorded
    as SKIPPED and fail the run, and ARCHIVE holds OUTDIR as it stood at the end (the device tool
    brings back 8 files at most, the script writes about 20). About 5-15 s."""
    archive = tmp_path / "back" / "gpu_check.tar.gz"
    run = _gpu_check(tmp_path / "out", BUDGET_S="42", ARCHIVE=str(archive))
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    names = [line.split(":")[0] for line in lines]
    assert names[:2] == ["environment", "kernel_tests"], lines
    assert names[-4:] == ["benchmark_targets", "benchmark_skew", "fairseq_amp", "benchmark"], lines
    assert lines[0].startswith("environment: FAIL (exit 1)"), lines
    assert all(line.endswith("SKIPPED (BUDGET_S=42 spent)") for line in lines[-4:]), lines
    with tarfile.open(archive) as tar:
        members = set(tar.getnames())
    assert {"out/summary.txt", "out/environment.log"} <= members, members
    assert not archive.with_name(archive.name + ".tmp").exists()


@pytest.mark.parametrize("env, words", [
    ({"BUDGET_S": "ten"}, "BUDGET_S must be a positive number of seconds, got 'ten'"),
    ({"ARCHIVE": "{out}/inside.tar.gz"}, "must lie outside OUTDIR"),
    ({"ONLY": "environment benchmarks"}, "ONLY names an unknown step 'benchmarks'; the steps: environment"),
])  # fmt: skip
def test_gpu_check_script_refuses_a_bad_budget_archive_or_step_name(tmp_path, env, words):
    out = tmp_path / "out"
    run = _gpu_check(out, **{key: value.format(out=out) for key, value in env.items()})
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert not (out / "summary.txt").exists()  # refused before anything ran


def test_gpu_check_script_runs_only_the_steps_named(tmp_path):
    """ONLY: the rerun of a first call's unfinished steps runs those alone (here: no CUDA, so it fails)."""
    run = _gpu_check(tmp_path / "out", ONLY="environment")
    assert run.returncode == 1, run.stderr[-2000:]
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("environment: FAIL (exit 1)"), lines


def test_gpu_check_script_fails_when_its_budget_skipped_a_step(tmp_path):
    """A step the budget could not hold has not passed: the run fails even though nothing else did."""
    run = _gpu_check(tmp_path / "out", ONLY="environment", BUDGET_S="30")  # under the 25 s reserve + 15
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "out" / "summary.txt").read_text() == "environment: SKIPPED (BUDGET_S=30 spent)\n"
