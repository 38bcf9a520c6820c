"""The launcher against a real single-node SLURM (scripts/slurm_local.sh) with accounting.

Covers: a job array with 2 gloo tasks per job, preemption through submitit's checkpoint path
(job._interrupt -> requeue -> resume), a real timeout requeue, fake-GPU GRES scheduling, re-run
idempotency and a failing arm. Every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from slurm.cli import make_executor
from slurm.job import TrainJob, probe
from slurm.spec import load
from slurm.cli import job_spec

from .conftest import run_cli, tiny_sweep, wait_done

pytestmark = pytest.mark.slurm


def _result(sweep_dir, run_id) -> dict:
    return json.loads((sweep_dir / run_id / "result.json").read_text())


def test_job_array_two_gloo_tasks_report_rerun_and_failure(tmp_path, corpus, slurm_cluster):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="arr", grid={"arch": ["softmax_transformer", "clustered_transformer"]},
                      arms=[{"name": "ok"}, {"name": "bad", "hash_bits": 64}], resources__tasks_per_node=2)  # fmt: skip
    proc = run_cli(["run", str(path), "--cluster", "slurm", "--wait"], timeout=420)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "arr"
    jobs = json.loads((sweep_dir / "jobs.json").read_text())
    ids = {run: entry["job_id"] for run, entry in jobs.items()}
    assert all(re.fullmatch(r"\d+_\d", i) for i in ids.values()), ids  # one job array
    assert len({i.split("_")[0] for i in ids.values()}) == 1
    for run_id in ("ok_softmax_s1", "ok_clustered_s1"):
        result = _result(sweep_dir, run_id)
        assert result["state"] == "finished" and result["updates"] == 8 and result["world_size"] == 2, result
        assert "--distributed-world-size" in result["command"] and "gloo" in result["command"]
        log0 = (sweep_dir / run_id / "train.log").read_text()
        log1 = (sweep_dir / run_id / "train.rank1.log").read_text()
        assert "training on 2 devices" in log0  # fairseq saw a world of 2 ...
        assert "as rank 1" in log1  # ... and rank 1 joined it
    bad = _result(sweep_dir, "bad_softmax_s1")
    assert bad["state"] == "failed" and "hash" in bad["error"]
    md = (sweep_dir / "results.md").read_text()
    assert "| ok_softmax | softmax | 1/1 |" in md and "| ok_clustered | clustered | 1/1 |" in md and "`bad_clustered_s1`: failed" in md
    # Re-running: the finished runs are skipped; nothing is submitted for them.
    again = run_cli(["run", str(path), "--cluster", "slurm", "--dry-run"], timeout=120)
    assert "4 runs, 2 finished (skipped)" in again.stdout and "2 to launch" in again.stdout, again.stdout
    status = run_cli(["status", str(path)], timeout=120)
    assert status.returncode == 0 and ids["ok_softmax_s1"] in status.stdout


def _sweep(tmp_path, corpus, name, **changes):
    path = tiny_sweep(tmp_path / f"{name}.yaml", corpus, name=name, grid={"arch": ["clustered_transformer"]}, **changes)
    return load(path)


def test_preemption_requeues_and_resumes_to_the_same_updates(tmp_path, corpus, slurm_cluster):
    sweep = _sweep(tmp_path, corpus, "pre", budget={"max_update": 400}, fairseq__save_interval_updates=10,
                   fairseq__validate_interval_updates=100)  # fmt: skip
    run = sweep.runs()[0]
    executor = make_executor(sweep, "slurm")
    job = executor.submit(TrainJob(job_spec(sweep, run)))
    run_dir = sweep.dir / run.run_id
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "checkpoint_last.pt").is_file():
        assert time.time() < deadline and not job.done(), f"no checkpoint before the interrupt ({job.state})"
        time.sleep(0.5)
    job._interrupt()  # preemption: USR2 -> TrainJob.checkpoint -> requeue
    wait_done([job], 300)
    assert job.result()["state"] == "finished"  # the requeued job's own return value
    result = _result(sweep.dir, run.run_id)
    assert result["state"] == "finished" and result["attempts"] == 2 and result["requeues"] == 1, result
    assert result["restart_count"] == 1 and result["updates"] == 400
    log = (run_dir / "train.log").read_text()
    resumed = re.findall(r"Loaded checkpoint \S+ \(epoch \d+ @ (\d+) updates\)", log)
    assert resumed and int(resumed[-1]) >= 10, "the second attempt did not resume from checkpoint_last.pt"
    assert len(list(sweep.dir.rglob("result.json"))) == 1


def test_timeout_requeues_and_finishes(tmp_path, corpus, slurm_cluster):
    # 1-minute limit, USR2 50 s before it: every attempt is signalled ~10 s in; the 25 s training
    # budget (cumulative across restarts in fairseq) therefore needs at least one requeue.
    sweep = _sweep(tmp_path, corpus, "tmo", budget={"max_update": 100000, "wall_minutes": 0.4},
                   resources__time_min=1, resources__signal_delay_s=50, fairseq__save_interval_updates=5,
                   fairseq__validate_interval_updates=100000)  # fmt: skip
    run = sweep.runs()[0]
    job = make_executor(sweep, "slurm").submit(TrainJob(job_spec(sweep, run)))
    wait_done([job], 400)
    result = _result(sweep.dir, run.run_id)
    assert job.result()["state"] == "finished" and result["state"] == "finished", result
    assert result["requeues"] >= 1 and result["attempts"] >= 2


def test_gpus_per_node_become_tasks_with_gres(tmp_path, corpus, slurm_cluster):
    sweep = _sweep(tmp_path, corpus, "gpu", resources__gpus_per_node=2)
    job = make_executor(sweep, "slurm").submit(probe)
    wait_done([job], 120)
    seen = sorted(job.results(), key=lambda r: r["global_rank"])
    assert [r["global_rank"] for r in seen] == [0, 1] and all(r["num_tasks"] == 2 for r in seen)
    assert [r["local_rank"] for r in seen] == [0, 1]
    assert all(r["slurm_gpus_on_node"] == "2" for r in seen), seen
    assert all(r["cuda_visible_devices"] for r in seen)
