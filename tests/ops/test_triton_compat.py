"""The GPU kernels on triton 3.6.0, the oldest the dispatcher accepts (backend.MIN_TRITON) and the
version of the GPU verification machines (torch 2.11), beside the venv's own triton 3.9.0.

triton 3.6.0 is installed from the package index, exactly as requirements/triton-compat.txt pins it
(``--require-hashes --no-deps --target``), into ``triton-3.6/`` inside the venv that runs the tests
(``.venv/triton-3.6/``), and reused while that file is unchanged. Subprocesses put it first on
``PYTHONPATH`` and print the triton they imported, which must be 3.6.0 from there:

* the ahead-of-time compile check, every configuration for sm_80 and sm_90
  (experiments/benchmarks/compile_kernels.py, with triton 3.6's own ptxas);
* a subset of the interpreter tests (``TRITON_INTERPRET=1 FAIRSEQ_PLUGIN_TRITON_ON_CPU=1``): every
  op family in fp32 and fp16, backward too where there is one (cluster sum/broadcast, centroid
  softmax + top-k, the top-k attention, which also runs bf16), with edge cases (sizes off the block,
  an empty and a 90 % cluster, padding, k = 1 and k = S, top-k ties).

When the install fails (no route to the package index) the tests skip with pip's reason, and fail
under ``CI=true``. What this cannot check: anything that needs a GPU, and torch 2.11's own
integration with triton 3.6 (torch 2.13 runs here).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
REQUIREMENTS = ROOT / "requirements" / "triton-compat.txt"
VERSION = re.search(r"^triton==(\S+)", REQUIREMENTS.read_text(), re.M).group(1)
CACHE = Path(sys.prefix) / f"triton-{'.'.join(VERSION.split('.')[:2])}"  # .venv/triton-3.6/
STAMP = ".requirements-sha256"

# test_triton_clustering.py: each op family forward (+ backward for the sums), fp32 and fp16, edges
CLUSTERING = [
    "test_implementation_says_triton",
    "test_interpreter_shuffles_programs_and_poisons_memory",  # tests/ops/hostile.py works on 3.6 too
    "test_interpreter_checks_bounds_and_barriers",
    "test_hash_bit_identical_when_projections_are_exact[17-dtype0]",  # fp32, 420 rows
    "test_hash_bit_identical_when_projections_are_exact[63-dtype1]",  # fp16, 63 bits
    "test_hash_random_differs_only_at_the_threshold[dtype1]",  # fp16, a partial feature tile
    "test_kmeans_bit_identical_to_the_reference[plain]",
    "test_kmeans_bit_identical_to_the_reference[many_clusters]",  # two centroid chunks
    "test_kmeans_bit_identical_to_the_reference[multi_block]",  # three query blocks, left and right padding
    "test_kmeans_bit_identical_to_the_reference[empty_cluster]",  # the reseed
    "test_cluster_sum_and_broadcast[shape0-dtype0]",  # fp32, forward and backward
    "test_cluster_sum_and_broadcast[shape1-dtype1]",  # fp16, a 90 % cluster
    "test_cluster_sum_non_finite_stays_in_its_cluster[dtype1]",
    "test_clustered_attention_matches_the_reference",  # end to end, forward and backward
]
# test_triton_attention.py: the centroid softmax + top-k and the top-k attention, forward and backward
ATTENTION = [
    "case_softmax_topk_ties_to_lowest_index",
    "case_softmax_topk_gradient_matches_reference",
    "case_softmax_topk_threshold_and_chunk_merge_paths",
    "case_products_fp32_edges",  # sizes off the tiles, key and query padding
    "case_products_skewed_and_empty_cluster",
    "case_products_k1_and_k_equals_s",
    "case_fp16_within_twice_reference_error",
    "case_bf16_within_twice_reference_error",
]


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _install() -> None:
    """pip install the pinned wheel into a fresh directory beside CACHE, then move it in place."""
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{CACHE.name}-", dir=CACHE.parent))
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # constraints.txt pins 3.9.0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--require-hashes", "--target", str(fresh), "-r", str(REQUIREMENTS)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        why = (run.stderr.strip() or run.stdout.strip() or f"exit {run.returncode}").splitlines()[-3:]
        ok = run.returncode == 0
    except subprocess.TimeoutExpired:
        ok, why = False, ["pip timed out after 900 s"]
    if not ok:
        shutil.rmtree(fresh, ignore_errors=True)
        _unavailable(f"cannot install triton {VERSION} (requirements/triton-compat.txt): {' | '.join(why)}")
    (fresh / STAMP).write_text(hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest())
    shutil.rmtree(CACHE, ignore_errors=True)
    fresh.rename(CACHE)


@pytest.fixture(scope="module")
def triton_dir() -> Path:
    """CACHE, holding triton VERSION as requirements/triton-compat.txt pins it (installed if needed)."""
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = CACHE / STAMP
    if not (stamp.is_file() and stamp.read_text() == want and (CACHE / "triton" / "__init__.py").is_file()):
        _install()
    return CACHE


def _env(triton_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FAIRSEQ_PLUGIN_TRITON_ON_CPU")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton_dir), str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _assert_imported(output: str, triton_dir: Path, marker: str) -> None:
    """The subprocess's ``<marker> <version> (<package dir>)`` line names VERSION from triton_dir."""
    found = re.search(rf"^{marker} (\S+) \((.*)\)$", output, re.M)
    assert found, f"the subprocess did not say which triton it imported:\n{output[-3000:]}"
    version, where = found.groups()
    same = Path(where).resolve() == (triton_dir / "triton").resolve()
    assert version == VERSION and same, f"imported triton {version} from {where}, not {VERSION} from {triton_dir}"


def test_the_pin_is_the_oldest_triton_the_dispatcher_accepts():
    from fairseq_plugin.ops import backend

    minimum = backend.MIN_TRITON
    assert backend._parse(VERSION) == minimum, f"triton-compat.txt pins {VERSION}, backend.MIN_TRITON is {minimum}"


def test_compile_check(triton_dir, tmp_path):
    out = tmp_path / "compile.csv"
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmarks" / "compile_kernels.py"), "--arch", "sm_80,sm_90",
         "--out", str(out)],
        env=_env(triton_dir), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    _assert_imported(run.stdout, triton_dir, "triton")
    failures = [line for line in run.stderr.splitlines() if line.startswith("FAIL") or "Error" in line]
    assert run.returncode == 0, "\n".join(failures[-20:]) or run.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"} and all(row["status"] == "ok" for row in rows)
    assert all(row["tile"] != "none" for row in rows if row["arch"] == "sm_90")


@pytest.fixture(scope="module")
def interpreted(triton_dir) -> dict:
    """Run the CLUSTERING tests and ATTENTION cases in one child under the interpreter:
    {name: None if it passed, else why}."""
    pytest.importorskip("numpy")  # the interpreter needs it; triton's wheel does not declare it
    env = _env(triton_dir, TRITON_INTERPRET="1", FAIRSEQ_PLUGIN_TRITON_ON_CPU="1", OMP_NUM_THREADS="1",
               FAIRSEQ_PLUGIN_TEST_DEVICE="cpu")
    run = subprocess.run([sys.executable, str(HERE), "--child"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    output = run.stdout + run.stderr
    _assert_imported(run.stdout, triton_dir, "TRITON")
    summary = re.finditer(r"^(PASSED|FAILED|ERROR|SKIPPED) \S*?::(\S+)", run.stdout, re.M)  # pytest -rA
    outcomes = {m.group(2): m.group(1) for m in summary}
    results = {name: None if outcomes.get(name) == "PASSED" else f"{outcomes.get(name)}\n{run.stdout[-6000:]}"
               for name in CLUSTERING}
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"the attention cases did not report (rc {run.returncode}):\n{output[-5000:]}"
    results.update(json.loads(lines[-1][len("RESULTS "):]))
    return results


@pytest.mark.parametrize("name", CLUSTERING + ATTENTION)
def test_interpreter(interpreted, name):
    assert interpreted[name] is None, interpreted[name]


def _child() -> None:
    """In the child (interpreter variables set, triton 3.6 first on PYTHONPATH)."""
    import triton

    print(f"TRITON {triton.__version__} ({Path(triton.__file__).parent})", flush=True)
    import pytest

    clustering = HERE.parent / "test_triton_clustering.py"
    pytest.main(["-q", "-rA", "-p", "no:cacheprovider", *(f"{clustering}::{name}" for name in CLUSTERING)])
    sys.stdout.flush()
    from tests.ops import test_triton_attention

    test_triton_attention._child(ATTENTION)  # prints RESULTS {case: None or traceback}


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child()
