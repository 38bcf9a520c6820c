"""The launcher on a real two-node SLURM (``NODES=2 scripts/slurm_local.sh``): each slurmd in its
own network namespace with its own address and host name, so a 2-node job is a real one: gloo
across the namespaces, the rendezvous file on the shared filesystem, a multi-node requeue and a
node that dies mid-run.

The cluster starts once per session, beside the single-node one (its own PORT_BASE, subnet and
directory); each test points SLURM_CONF at it only while it runs. Where network namespaces
cannot be made, the tests skip, except under CI=true, where they fail: CI must not go quiet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, last_saved, newest_checkpoint, run_cli, tiny_sweep

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "scripts" / "slurm_local.sh"
PORT_BASE = "16910"  # the single-node cluster uses 16810..16819
NO_NETNS = ("cannot make a network namespace", "cannot make a bridge", "needs root", "needs iproute2")


def _script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NODES": "2", "PORT_BASE": PORT_BASE})  # fmt: skip


@pytest.fixture(scope="session")
def two_node_dir(tmp_path_factory):
    """Start the two-node SLURM once; yield its directory; stop it (daemons, namespaces) at the end."""
    state = tmp_path_factory.mktemp("slurm2")
    proc = _script("start", str(state), timeout=300)
    if proc.returncode != 0:
        _script("stop", str(state))  # whatever it had made: daemons, bridge, namespaces
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        if any(text in proc.stderr for text in NO_NETNS):
            message = f"no two-node SLURM on this machine: {why}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message + " (CI=true: this must run in CI)")
            pytest.skip(message)
        pytest.fail(f"could not start the two-node SLURM (NODES=2 scripts/slurm_local.sh):\n{proc.stderr[-2000:]}")
    yield state
    _script("stop", str(state))


@pytest.fixture
def two_nodes(two_node_dir, monkeypatch) -> Path:
    """The two-node cluster, both nodes idle, as this test's SLURM_CONF."""
    monkeypatch.setenv("SLURM_CONF", str(two_node_dir / "etc" / "slurm.conf"))
    for node in ("node1", "node2"):  # a test that killed a node brings it back; make sure
        if _node_state(node) not in ("idle", "mixed", "allocated"):
            proc = _script("start-node", str(two_node_dir), node)
            assert proc.returncode == 0, proc.stderr[-2000:]
    return two_node_dir


def _node_state(node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def _sweep(tmp_path: Path, corpus: Path, name: str, **changes) -> Path:
    resources = {"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time_min": 10, "mem_gb": 1}
    return tiny_sweep(tmp_path / f"{name}.yaml", corpus, name=name, grid={"arch": ["clustered_transformer"]},
                      resources=resources, **changes)  # fmt: skip


def _result(run_dir: Path) -> dict:
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _job_id(sweep_dir: Path, run_id: str) -> str:
    return json.loads((sweep_dir / "jobs.json").read_text())[run_id]["job_id"]


def _wait(what: str, ok, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while not (value := ok()):
        assert time.time() < deadline, f"{what}: not after {timeout}s"
        time.sleep(every)
    return value


def _ended(result: dict, attempt: int) -> bool:
    """Attempt ``attempt`` (or a later one) of the run has ended, finished or failed."""
    return result.get("attempts", 0) >= attempt and result.get("state") in ("finished", "failed")


def _loaded(log: str) -> list[int]:
    return [int(u) for u in re.findall(r"Loaded checkpoint \S+ \(epoch \d+ @ (\d+) updates\)", log)]


def test_two_nodes_one_task_each_train_over_gloo(tmp_path, corpus, two_nodes):
    path = _sweep(tmp_path, corpus, "mn")
    proc = run_cli(["run", str(path), "--cluster", "slurm", "--wait", "--progress-every", "10"], timeout=240)
    run_dir = tmp_path / "sweeps" / "mn" / "clustered_s1"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 nodes x 1 task" in proc.stdout or "2 nodes" in proc.stdout, proc.stdout
    result = _result(run_dir)
    assert result["state"] == "finished" and result["updates"] == 8 and result["world_size"] == 2, result
    assert result["nodes"] == ["node1", "node2"], result  # what `status` shows as the run's nodes
    log0, log1 = (run_dir / "train.log").read_text(), (run_dir / "train.rank1.log").read_text()
    # Both ranks joined one world, each from its own host (namespace), rank 0's host the master.
    assert re.search(r"initialized host node1 as rank 0\b", log0), log0[-3000:]
    assert re.search(r"initialized host node2 as rank 1\b", log1), log1[-3000:]
    assert "training on 2 devices" in log0
    init = re.findall(r"--distributed-init-method tcp://(\S+):(\d+)", log0 + log1)
    assert len(init) == 2 and init[0] == init[1] and init[0][0] == "node1", init
    assert list(run_dir.glob(".rendezvous-*")) == []  # rank 0 removed its file when it ended


def _job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    found = re.search(rf"\b{field}=(\S*)", out)
    return found.group(1) if found else ""


def _started_run(tmp_path: Path, corpus: Path, name: str) -> tuple[Path, Path, str]:
    """Launch a 120-update 2-node run (`fairseq-sweep run`, not waiting); return once it saved a checkpoint."""
    path = _sweep(tmp_path, corpus, name, budget={"max_update": 120}, fairseq__save_interval_updates=10,
                  fairseq__validate_interval_updates=1000)  # fmt: skip
    sweep_dir = tmp_path / "sweeps" / name
    run_dir = sweep_dir / "clustered_s1"
    proc = run_cli(["run", str(path), "--cluster", "slurm"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log0 = run_dir / "train.log"
    _wait("a saved checkpoint", lambda: log0.is_file() and "Saved checkpoint" in log0.read_text(), 150)
    assert _result(run_dir).get("state") == "running"
    return path, run_dir, _job_id(sweep_dir, "clustered_s1")


def test_preempted_two_node_job_requeues_and_resumes_to_the_same_updates(tmp_path, corpus, two_nodes):
    # SLURM's preemption by requeue: every task of both nodes is signalled and killed, the job goes
    # back to the queue under the same id, and the next attempt (a new rendezvous) resumes.
    _, run_dir, job = _started_run(tmp_path, corpus, "mnpre")
    saved = last_saved((run_dir / "train.log").read_text())
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
    _wait("the requeued job's end", lambda: _ended(_result(run_dir), attempt=2), 240, every=1)
    result = _result(run_dir)
    assert result["state"] == "finished" and result["updates"] == 120, result  # what an uninterrupted run ends at
    assert result["attempts"] == 2 and result["restart_count"] == 1 and result["job_id"] == job, result
    assert result["nodes"] == ["node1", "node2"]
    resumed = _loaded((run_dir / "train.log").read_text().split("===== attempt 2")[1])
    assert resumed and resumed[0] >= saved, (resumed, saved)  # resumed from its checkpoint, not from scratch
    assert (run_dir / "train.rank1.log").read_text().count("\n===== attempt ") == 2  # rank 1 came back too
    assert newest_checkpoint(run_dir / "checkpoints") == 120


def test_a_node_dies_mid_run_and_the_run_resumes_without_losing_saved_updates(tmp_path, corpus, two_nodes):
    path, run_dir, job = _started_run(tmp_path, corpus, "mnfail")
    log0 = run_dir / "train.log"
    # node2 dies: its slurmd, slurmstepd and rank 1 at once (SIGKILL to every process in its namespace).
    kill = _script("kill-node", str(two_nodes), "node2")
    assert kill.returncode == 0, kill.stderr
    saved = last_saved(log0.read_text())  # the last update logged as saved before the failure
    # The controller finds the node silent (SlurmdTimeout=10), marks it down and ends the job:
    # NODE_FAIL and back to the queue (batch jobs are requeueable), or failed where requeue is off.
    _wait("node2 marked down", lambda: _node_state("node2").startswith("down"), 90)
    _wait("the job off node2", lambda: _job_field(job, "JobState") not in ("RUNNING", "COMPLETING"), 90)
    start = _script("start-node", str(two_nodes), "node2")  # the node comes back (ReturnToService=2)
    assert start.returncode == 0, start.stderr[-2000:]
    # The next `fairseq-sweep run` resumes the run: it relaunches it, or leaves SLURM's requeued job be.
    rerun = run_cli(["run", str(path), "--cluster", "slurm"], timeout=120)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    _wait("the resumed run's end", lambda: _ended(_result(run_dir), attempt=2), 240, every=1)
    result = _result(run_dir)  # (attempt 1 ended "failed": rank 0 lost its peer before SLURM saw the node go)
    assert result["state"] == "finished" and result["updates"] == 120, result
    assert result["attempts"] == 2 and result["nodes"] == ["node1", "node2"], result
    resumed = _loaded(log0.read_text().split("===== attempt 2")[1])
    assert resumed and resumed[0] >= saved, (resumed, saved)  # no update lost that was logged as saved
    assert newest_checkpoint(run_dir / "checkpoints") == 120
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job, "-o", "State"], capture_output=True, text=True,
                             timeout=60).stdout.split()  # fmt: skip
    assert "NODE_FAIL" in history or "FAILED" in history, history  # SLURM saw the failure
