"""Fixtures for the launcher tests: a tiny corpus, tiny sweep files, and a real local SLURM.

The SLURM controller (scripts/slurm_local.sh) starts once per session, on first use, and stops
at the end by pid; every test gets its own sweep root (job ids restart at 1 with fresh state).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the real local SLURM controller (scripts/slurm_local.sh)")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small binarised masked-LM corpus (quickstart's grammar, 200 paragraphs)."""
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([PY, str(REPO / "experiments" / "prepare_demo_data.py"), "--out", str(out), "--lines", "200"],
                   check=True, capture_output=True, timeout=180)  # fmt: skip
    return out / "data-bin"


def tiny_sweep(path: Path, data: Path, name: str = "t", **changes) -> Path:
    """Write a tiny sweep (1-layer, 32-dim model, 64-token samples) and return its path."""
    spec = {
        "name": name,
        "root": str(path.parent / "sweeps"),
        "task": "masked_lm",
        "data": {"path": str(data)},
        "fairseq": {
            "criterion": "masked_lm", "encoder_layers": 1, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
            "encoder_attention_heads": 2, "tokens_per_sample": 64, "max_positions": 64, "optimizer": "adam",
            "lr": 1e-3, "lr_scheduler": "fixed", "batch_size": 8, "validate_interval_updates": 4,
            "save_interval_updates": 4, "keep_interval_updates": 1, "no_epoch_checkpoints": True, "cpu": True,
            "required_batch_size_multiple": 1, "num_workers": 0, "log_interval": 2, "no_progress_bar": True,
        },
        "model": {"clusters": 4, "topk": 8},
        "grid": {"arch": ["softmax_transformer", "clustered_transformer"]},
        "seeds": [1],
        "resources": {"cpus_per_task": 1, "time_min": 10, "mem_gb": 1},
        "budget": {"max_update": 8},
        "metric": {"name": "loss", "split": "valid", "lower_is_better": True},
    }  # fmt: skip
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            spec.setdefault(section, {})[sub] = value
        elif value is None:
            spec.pop(section, None)
        else:
            spec[section] = value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start the single-node SLURM once; yield its SLURM_CONF; stop it by pid at the end."""
    state = Path(os.environ.get("SLURM_TEST_DIR") or tmp_path_factory.mktemp("slurm"))
    script = REPO / "scripts" / "slurm_local.sh"
    proc = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"could not start the local SLURM (scripts/slurm_local.sh):\n{proc.stderr[-2000:]}")
    conf = str(state / "etc" / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def wait_done(jobs, timeout: float):
    """Wait for submitit jobs with a deadline (a pending job would otherwise hang the suite)."""
    deadline = time.time() + timeout
    for job in jobs:
        while not job.done():
            if time.time() > deadline:
                for j in jobs:
                    j.cancel(check=False)
                pytest.fail(f"job {job.job_id} not done after {timeout}s (state {job.state})")
            time.sleep(1)


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """fairseq-sweep as a user runs it (python -m slurm), with a deadline."""
    return subprocess.run([PY, "-m", "slurm", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. a sweep directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and proc.name != str(os.getpid()):
            found.append(cmdline)
    return found


def last_saved(log: str) -> int:
    """The update count of the last checkpoint that train.log says was saved."""
    return max(int(u) for u in re.findall(r"Saved checkpoint \S+ \(epoch \d+ @ (\d+) updates", log))


def newest_checkpoint(checkpoints: Path) -> int:
    """The update count of the newest ``checkpoint_<epoch>_<updates>.pt`` on disk.

    A job killed mid-save may have written (atomically) and even copied a checkpoint whose
    "Saved checkpoint" line never reached the log, so a resume can load more updates than
    :func:`last_saved` says. A resume budget above this count is always reached exactly
    (fairseq takes one step before it checks ``--max-update``).
    """
    names = [re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", p.name) for p in checkpoints.glob("checkpoint_*_*.pt")]
    found = [int(m.group(1)) for m in names if m]
    assert found, f"no interval checkpoint in {checkpoints}"
    return max(found)
