"""The launcher against a real single-node SLURM (scripts/slurm_local.sh) with accounting.

Covers: job arrays per resource set (2 gloo tasks per job, an arm with 1), preemption through
submitit's checkpoint path (job._interrupt -> requeue -> resume), a real timeout requeue, fake-GPU
GRES scheduling, re-run idempotency, a failing arm (exit status 1), job states while sacct lags,
and cancelling a running array that a `run --wait` watches, then resuming it. Every wait has a
deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from slurm.backends import SlurmBackend, SubmissionError
from slurm.job import TrainJob, probe
from slurm.spec import Sweep, job_spec, load

from .conftest import PY, REPO, last_saved, newest_checkpoint, processes_mentioning, run_cli, tiny_sweep, wait_done

pytestmark = pytest.mark.slurm
SLURM = SlurmBackend()


def slurm_states(sweep: Sweep | None, job_ids: list[str]) -> dict[str, str]:
    return SLURM.states(sweep, job_ids)  # SLURM's states need no sweep


def make_executor(sweep: Sweep, max_num_timeout: int = 3):
    return SlurmBackend(max_num_timeout).executor(sweep, sweep.resources)


def _result(sweep_dir, run_id) -> dict:
    return json.loads((sweep_dir / run_id / "result.json").read_text())


def test_job_arrays_per_resources_two_gloo_tasks_report_rerun_and_failure(tmp_path, corpus, slurm_cluster):
    # The sweep runs 2 tasks per job; the failing arm overrides it to 1: two job arrays.
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="arr", grid={"arch": ["softmax_transformer", "clustered_transformer"]},
                      arms=[{"name": "ok"}, {"name": "bad", "hash_bits": 64, "resources": {"tasks_per_node": 1}}],
                      resources__tasks_per_node=2)  # fmt: skip
    proc = run_cli(["run", str(path), "--cluster", "slurm", "--wait", "--progress-every", "5"], timeout=420)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]  # the bad arm failed
    sweep_dir = tmp_path / "sweeps" / "arr"
    summary = [line.strip() for line in proc.stdout.split("2 of 4 launched run(s) did not finish:")[1].strip().splitlines()]
    assert [line.split()[:2] for line in summary] == [["FAILED", "bad_softmax_s1:"], ["FAILED", "bad_clustered_s1:"]]
    assert all("--hash-bits" in line and line.endswith("/train.log") for line in summary), summary
    assert re.search(r"\[sweep\] \d+m\d+s: .*running \(", proc.stdout), proc.stdout  # progress while waiting
    jobs = json.loads((sweep_dir / "jobs.json").read_text())
    ids = {run: entry["job_id"] for run, entry in jobs.items()}
    assert all(re.fullmatch(r"\d+_\d", i) for i in ids.values()), ids  # job arrays
    arrays = {run: i.split("_")[0] for run, i in ids.items()}
    assert arrays["ok_softmax_s1"] == arrays["ok_clustered_s1"] != arrays["bad_softmax_s1"] == arrays["bad_clustered_s1"]
    assert proc.stdout.count("submitted job array") == 2 and "1 node x 2 tasks" in proc.stdout
    assert _result(sweep_dir, "bad_softmax_s1")["world_size"] == 1
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
    # Submitted as the launcher submits (SlurmBackend.submit), so that the checkpoint path tested is
    # the one a `fairseq-sweep run` job takes (it once submitted a plain function, never checkpointed).
    (job,) = SLURM.submit(sweep, sweep.resources, [TrainJob(job_spec(sweep, run))])
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
    # A 2-minute limit, USR2 requested 50 s before it. SLURM may send it up to 60 s early (sbatch's
    # --signal; slurmctld looks every 30 s), so an attempt is signalled 10-70 s in (54 s seen): never
    # before submitit's handler is up, which a 1-minute limit could not promise (SlurmBackend refuses
    # it). The 75 s training budget (cumulative across restarts in fairseq) is more than one attempt can
    # train (at most 70 s less fairseq's ~5 s start-up), so a requeue is certain. On a loaded machine
    # start-up eats more of each attempt, so more than submitit's default 3 requeues may be needed.
    sweep = _sweep(tmp_path, corpus, "tmo", budget={"max_update": 100000, "wall_minutes": 1.25},
                   resources__time_min=2, resources__signal_delay_s=50, fairseq__save_interval_updates=5,
                   fairseq__validate_interval_updates=100000)  # fmt: skip
    run = sweep.runs()[0]
    (job,) = SlurmBackend(max_num_timeout=12).submit(sweep, sweep.resources, [TrainJob(job_spec(sweep, run))])
    wait_done([job], 600)
    result = _result(sweep.dir, run.run_id)
    assert job.result()["state"] == "finished" and result["state"] == "finished", result
    assert result.get("requeues", 0) >= 1 and result["attempts"] >= 2, result


def test_a_signal_that_could_come_before_the_job_starts_is_refused(tmp_path, corpus):
    sweep = _sweep(tmp_path, corpus, "early", resources__time_min=1, resources__signal_delay_s=50)
    with pytest.raises(SubmissionError) as err:
        SlurmBackend().submit(sweep, sweep.resources, [TrainJob(job_spec(sweep, sweep.runs()[0]))])
    assert "set time_min >= 2 or lower signal_delay_s" in str(err.value) and "\n" not in str(err.value)
    assert not (sweep.dir / "submitit").exists()  # refused before sbatch


def test_gpus_per_node_become_tasks_with_gres(tmp_path, corpus, slurm_cluster):
    sweep = _sweep(tmp_path, corpus, "gpu", resources__gpus_per_node=2)
    job = make_executor(sweep).submit(probe)
    wait_done([job], 120)
    seen = sorted(job.results(), key=lambda r: r["global_rank"])
    assert [r["global_rank"] for r in seen] == [0, 1] and all(r["num_tasks"] == 2 for r in seen)
    assert [r["local_rank"] for r in seen] == [0, 1]
    assert all(r["slurm_gpus_on_node"] == "2" for r in seen), seen
    assert all(r["cuda_visible_devices"] for r in seen)


def test_job_states_are_known_before_sacct_lists_the_job(tmp_path, slurm_cluster):
    # sacct learns of a job from slurmdbd some time after the controller; until then it does not
    # list it (or says PENDING). status/run/cancel must still see it as alive, never UNKNOWN.
    out = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--time=2", f"--output={tmp_path}/%A_%a.out",
                          "--wrap", "sleep 30"], capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    array = out.stdout.strip().split(";")[0]
    ids = [f"{array}_0", f"{array}_1"]
    try:
        states = slurm_states(None, ids)
        assert len(states) == 2, states
        assert all(s.split()[0] in ("PENDING", "RUNNING", "CONFIGURING") for s in states.values()), states
    finally:
        subprocess.run(["scancel", array], capture_output=True, timeout=60)
    deadline = time.time() + 60
    while True:
        states = slurm_states(None, ids)
        if all((states[i] or "").startswith("CANCELLED") for i in ids):
            break
        assert time.time() < deadline, states
        time.sleep(0.5)
    assert slurm_states(None, ["999999"]).get("999999", "UNKNOWN") in ("UNKNOWN", "")  # an id SLURM never had


def test_cancel_a_watched_array_then_resume(tmp_path, corpus, slurm_cluster):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="scan", budget={"max_update": 100000, "wall_minutes": 3},
                      fairseq__validate_interval_updates=1000)  # fmt: skip
    sweep_dir = tmp_path / "sweeps" / "scan"
    runs = ("softmax_s1", "clustered_s1")
    watch = [PY, "-m", "slurm", "run", str(path), "--cluster", "slurm", "--wait", "--progress-every", "2"]
    watcher = subprocess.Popen(watch, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not all((sweep_dir / r / "checkpoints" / "checkpoint_last.pt").is_file() for r in runs):
            assert watcher.poll() is None and time.time() < deadline, "the jobs did not get to a checkpoint"
            time.sleep(0.5)
        status = run_cli(["status", str(path)], timeout=120)
        assert status.stdout.count("running (slurm: RUNNING)") == 2, status.stdout
        cancel = run_cli(["cancel", str(path)], timeout=180)
        out, _ = watcher.communicate(timeout=180)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr[-2000:]
    ids = {r: e["job_id"] for r, e in json.loads((sweep_dir / "jobs.json").read_text()).items()}
    assert f"scancel {ids['softmax_s1']} {ids['clustered_s1']}" in cancel.stdout
    assert all(re.search(rf"cancelled {r} \(job {ids[r]}\) at \d+ updates", cancel.stdout) for r in runs), cancel.stdout
    assert all(s.startswith("CANCELLED") for s in slurm_states(load(path), list(ids.values())).values())
    # The watching launch saw the jobs end and says so, with a non-zero exit.
    assert watcher.returncode == 1, out[-3000:]
    assert "2 of 2 launched run(s) did not finish" in out and out.count("  CANCELLED ") == 2, out[-3000:]
    # Its progress lines saw the jobs run (squeue), even while sacct had not caught up.
    assert re.search(r"\[sweep\] \d+m\d+s: 0 finished, 2 running \(softmax_s1 @ \d+ updates, clustered_s1 @", out), out[-3000:]
    saved, on_disk = {}, {}
    for run_id in runs:
        result = _result(sweep_dir, run_id)
        assert result["state"] == "cancelled" and result["attempts"] == 1 and result["updates"] >= 4, result
        assert result["wall_time_s"] > 0 and result["cancelled_at"] > 0
        saved[run_id] = last_saved((sweep_dir / run_id / "train.log").read_text())
        on_disk[run_id] = newest_checkpoint(sweep_dir / run_id / "checkpoints")
    assert processes_mentioning(str(sweep_dir)) == []
    assert list(sweep_dir.rglob("*.tmp")) == [] and not [p for p in sweep_dir.rglob(".result.json.*") if p.suffix != ".lock"]
    status = run_cli(["status", str(path)], timeout=120)
    assert "2 runs: 2 cancelled" in status.stdout, status.stdout
    # Submit without waiting; the runs resume from their last checkpoints and finish.
    target = max(on_disk.values()) + 4
    resume = run_cli(["run", str(path), "--cluster", "slurm", f"budget.max_update={target}"], timeout=120)
    assert resume.returncode == 0 and "2 to launch" in resume.stdout and "submitted, not waiting" in resume.stdout
    deadline = time.time() + 240
    while not all(_result(sweep_dir, r)["state"] in ("finished", "failed") for r in runs):
        assert time.time() < deadline, [_result(sweep_dir, r)["state"] for r in runs]
        time.sleep(1)
    for run_id in runs:
        result = _result(sweep_dir, run_id)
        assert result["state"] == "finished" and result["attempts"] == 2 and result["updates"] == target, result
        log = (sweep_dir / run_id / "train.log").read_text().split("===== attempt 2")[1]
        loaded = re.findall(r"Loaded checkpoint \S+ \(epoch \d+ @ (\d+) updates\)", log)
        assert loaded and int(loaded[0]) >= saved[run_id], (run_id, loaded, saved)
