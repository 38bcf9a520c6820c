"""The launcher on submitit's local executor (real subprocesses) and in-process (debug): runs,
idempotency, lock, report, exit status, cancel and resume."""

from __future__ import annotations

import csv
import json
import os
import pdb
import re
import subprocess
import time

import pytest

from slurm.cli import main
from slurm.runs import LockedError, sweep_lock, write_json
from slurm.spec import load

from .conftest import PY, REPO, last_saved, newest_checkpoint, processes_mentioning, run_cli, tiny_sweep



def test_local_sweep_runs_reports_and_is_idempotent(tmp_path, corpus):
    # Two arms plus one that fails inside fairseq (an architecture option fairseq rejects).
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="loc", grid={"arch": ["softmax_transformer", "clustered_transformer"]},
                      arms=[{"name": "ok"}, {"name": "bad", "hash_bits": 64}])  # fmt: skip
    proc = run_cli(["run", str(path), "resources.parallel=2"], timeout=400)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]  # an arm failed: not 0
    sweep_dir = tmp_path / "sweeps" / "loc"
    # After the report, one line per failed run with the error and the log to read.
    summary = [line.strip() for line in proc.stdout.split("2 of 4 launched run(s) did not finish:")[1].strip().splitlines()]
    assert [line.split()[1].rstrip(":") for line in summary] == ["bad_softmax_s1", "bad_clustered_s1"], summary
    for line in summary:
        assert line.startswith("FAILED") and "fairseq-train exit" in line and "hash" in line, line
        assert line.endswith(f"log: {sweep_dir / line.split()[1].rstrip(':') / 'train.log'}"), line
    for run_id in ("ok_softmax_s1", "ok_clustered_s1"):
        result = json.loads((sweep_dir / run_id / "result.json").read_text())
        assert result["state"] == "finished" and result["updates"] == 8, result
        assert result["final_metric"] > 0 and result["best_metric"] <= result["final_metric"]
        assert result["command"][0].endswith("fairseq-train") and "--max-update" in result["command"]
        assert result["versions"]["torch"] and "git_commit" in result and result["wall_time_s"] > 0
        assert (sweep_dir / run_id / "checkpoints" / "checkpoint_last.pt").is_file()
        assert list((sweep_dir / "tb" / run_id / "valid").glob("events.out.tfevents.*"))
    bad = json.loads((sweep_dir / "bad_softmax_s1" / "result.json").read_text())
    assert bad["state"] == "failed" and bad["exit_code"] != 0 and "hash" in bad["error"]
    assert "[sweep] FAILED bad_softmax_s1" in proc.stdout  # said as it happened, too
    # The report: one row per run, the table printed, partial-sweep note, plots written.
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert {r["run_id"]: r["state"] for r in rows}["ok_clustered_s1"] == "finished" and len(rows) == 4
    md = (sweep_dir / "results.md").read_text()
    assert "| ok_softmax | softmax | 1/1 |" in md and "Partial sweep" in md and "bad_clustered_s1" in md
    assert (sweep_dir / "plots" / "metric_vs_time.png").stat().st_size > 1000
    assert (sweep_dir / "plots" / "learning_curves.png").stat().st_size > 1000
    assert "ok_softmax" in proc.stdout and "missing: 2 of 4" in proc.stdout
    # Re-running skips the finished runs (and retries only the failed ones).
    jobs_before = json.loads((sweep_dir / "jobs.json").read_text())
    again = run_cli(["run", str(path), "resources.parallel=2", "--dry-run"], timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 runs, 2 finished (skipped)" in again.stdout and "2 to launch" in again.stdout
    assert json.loads((sweep_dir / "jobs.json").read_text()) == jobs_before
    status = run_cli(["status", str(path)], timeout=120)
    assert "ok_clustered_s1" in status.stdout and "finished" in status.stdout and "failed" in status.stdout


class _CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling calls open(path, "w")
        return (open, (self.path, "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, corpus):
    """The launcher's resume (after its checkpoint repair) loads checkpoint_last.pt safely."""
    import torch

    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="evil", grid={"arch": ["softmax_transformer"]})
    checkpoints = tmp_path / "sweeps" / "evil" / "softmax_s1" / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "extra_state": {"note": _CreatesFile(marker)}}, checkpoints / "checkpoint_last.pt")
    proc = run_cli(["run", str(path)], timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not marker.exists(), "the crafted checkpoint ran code"
    result = json.loads((tmp_path / "sweeps" / "evil" / "softmax_s1" / "result.json").read_text())
    refusals = [line for line in result["error"].splitlines() if "refusing to load checkpoint" in line]
    assert result["state"] == "failed" and len(refusals) == 1, result["error"]
    assert "io.open" in refusals[0] and "FAIRSEQ_PLUGIN_TRUST_CHECKPOINTS=" in refusals[0], refusals[0]


def test_a_false_boolean_in_the_sweep_file_trains_false(tmp_path, corpus):
    """model: {hash_bias: false} reaches fairseq as --hash-bias false (it once vanished, so the
    default true trained); read back from the checkpoint's config."""
    from fairseq_plugin import checkpoints

    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="bools", grid={"arch": ["clustered_transformer"]},
                      model={"clusters": 4, "hash_bias": False}, budget={"max_update": 2})  # fmt: skip
    proc = run_cli(["run", str(path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = checkpoints.load(tmp_path / "sweeps" / "bools" / "clustered_s1" / "checkpoints" / "checkpoint_last.pt")
    model = state["cfg"]["model"]
    assert model.hash_bias is False and model.attention_stats is True and model.clusters == 4


def test_finished_sweep_submits_nothing(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="done", grid={"arch": ["clustered_transformer"]})
    first = run_cli(["run", str(path)], timeout=300)
    assert first.returncode == 0 and "1 to launch" in first.stdout, first.stderr[-2000:]
    result = (tmp_path / "sweeps" / "done" / "clustered_s1" / "result.json").read_text()
    second = run_cli(["run", str(path)], timeout=120)
    assert second.returncode == 0 and "1 finished (skipped)" in second.stdout and "0 to launch" in second.stdout
    assert "submitted" not in second.stdout
    assert (tmp_path / "sweeps" / "done" / "clustered_s1" / "result.json").read_text() == result


def test_lock_refuses_a_concurrent_launch(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="locked")
    sweep = load(path)
    with sweep_lock(sweep):
        with pytest.raises(LockedError):
            with sweep_lock(sweep):
                pass
        proc = run_cli(["run", str(path)], timeout=120)
        assert proc.returncode == 2 and "is being launched by pid" in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 or proc.stderr.strip().splitlines()[-1].startswith("fairseq-sweep: error")
    with sweep_lock(sweep):  # released
        pass


def test_result_json_is_written_atomically(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"state": "running"})
    write_json(target, {"state": "finished", "updates": 3})
    assert json.loads(target.read_text()) == {"state": "finished", "updates": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: others may read results


def test_unfinished_run_resumes_from_its_checkpoint(tmp_path, corpus):
    # A run whose launcher died (result.json still says "running") is relaunched on the next
    # `run` and fairseq continues from checkpoint_last.pt instead of starting over.
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="res", grid={"arch": ["softmax_transformer"]})
    assert run_cli(["run", str(path)], timeout=300).returncode == 0
    result_path = tmp_path / "sweeps" / "res" / "softmax_s1" / "result.json"
    result = json.loads(result_path.read_text())
    assert result["updates"] == 8
    result["state"] = "running"
    result_path.write_text(json.dumps(result))
    again = run_cli(["run", str(path), "budget.max_update=12"], timeout=300)
    assert again.returncode == 0 and "1 to launch" in again.stdout, again.stderr[-2000:]
    result = json.loads(result_path.read_text())
    assert result["state"] == "finished" and result["updates"] == 12 and result["attempts"] == 2
    log = (result_path.parent / "train.log").read_text()
    assert "@ 8 updates)" in log.split("===== attempt 2")[1]
    report = run_cli(["report", str(path)], timeout=120)
    assert report.returncode == 0 and "missing" not in report.stdout, report.stderr[-2000:]
    assert re.search(r"^softmax\s+softmax\s+1/1\s+[\d.]+\s+[\d.]+\s+12\s", report.stdout, re.M), report.stdout
    assert (tmp_path / "sweeps" / "res" / "results.md").is_file()


def test_debug_cluster_runs_in_process_records_failures_without_pdb(tmp_path, corpus, capsys, monkeypatch):
    # submitit's DebugJob.results() calls pdb.post_mortem on a failure; the launcher must not.
    entered = []
    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: entered.append("post_mortem"))
    monkeypatch.setattr(pdb, "set_trace", lambda *a, **k: entered.append("set_trace"))
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="dbg", grid={"arch": ["softmax_transformer"]},
                      arms=[{"name": "bad", "hash_bits": 64}, {"name": "ok"}], resources__tasks_per_node=2)  # fmt: skip
    code = main(["run", str(path), "--cluster", "debug"])
    out = capsys.readouterr().out
    assert entered == [] and code == 1, out[-3000:]
    sweep_dir = tmp_path / "sweeps" / "dbg"
    ok = json.loads((sweep_dir / "ok_softmax_s1" / "result.json").read_text())
    assert ok["state"] == "finished" and ok["updates"] == 8 and ok["world_size"] == 1, ok  # one task in-process
    bad = json.loads((sweep_dir / "bad_softmax_s1" / "result.json").read_text())
    assert bad["state"] == "failed" and "hash" in bad["error"]
    jobs = json.loads((sweep_dir / "jobs.json").read_text())
    assert {e["cluster"] for e in jobs.values()} == {"debug"} and all(e["job_id"].startswith("DEBUG_") for e in jobs.values())
    assert "debug: each job runs as ONE task in this process (2 tasks/node ignored)" in out
    assert out.index("FAILED bad_softmax_s1") < out.index("finished ok_softmax_s1")  # the launch went on
    line = re.search(r"^  FAILED bad_softmax_s1: .*$", out, re.M).group(0)  # the closing summary
    assert re.match(r"  FAILED bad_softmax_s1: fairseq-train exit [1-9]\d*: .*--hash-bits.*; log: ", line), line
    assert line.endswith(f"log: {sweep_dir / 'bad_softmax_s1' / 'train.log'}")
    assert "SUBMITIT_DEBUG_JOB_ID" not in os.environ


def test_cancel_stops_a_local_launch_and_run_resumes(tmp_path, corpus):
    # One training at a time (parallel=1): softmax runs, clustered waits in the launcher's queue.
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="can", budget={"max_update": 100000, "wall_minutes": 3},
                      resources__parallel=1, fairseq__validate_interval_updates=1000)  # fmt: skip
    sweep_dir = tmp_path / "sweeps" / "can"
    first = sweep_dir / "softmax_s1"
    launch = subprocess.Popen([PY, "-m", "slurm", "run", str(path), "--progress-every", "3"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not (first / "checkpoints" / "checkpoint_last.pt").is_file():
            assert launch.poll() is None and time.time() < deadline, "no checkpoint before the cancel"
            time.sleep(0.5)
        cancel = run_cli(["cancel", str(path)], timeout=180)
        out, _ = launch.communicate(timeout=120)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr[-2000:]
    assert "asking the running launch" in cancel.stdout and "cancelled softmax_s1 (stopped by its launch) at" in cancel.stdout
    assert launch.returncode == 130, out[-3000:]
    assert re.search(r"\[sweep\] \d+m\d+s: 0 finished, 1 running \(softmax_s1 @ \d+ updates\), 1 waiting", out), out
    assert "CANCELLED softmax_s1" in out and "NOT LAUNCHED clustered_s1" in out
    # Honest and complete records; nothing left running, nothing half-written.
    result = json.loads((first / "result.json").read_text())
    assert result["state"] == "cancelled" and result["attempts"] == 1 and result["cancelled_at"] > 0, result
    assert result["updates"] >= 4 and result["wall_time_s"] > 0
    assert not (sweep_dir / "clustered_s1" / "result.json").exists()  # never launched
    assert processes_mentioning(str(sweep_dir)) == []
    assert [p.name for p in first.iterdir() if p.name.startswith(".result.json.") and not p.name.endswith(".lock")] == []
    assert list(sweep_dir.rglob("*.tmp")) == []
    status = run_cli(["status", str(path)], timeout=120)
    assert re.search(r"^softmax_s1\s+cancelled\s+\d+", status.stdout, re.M) and "1 cancelled, 1 not started" in status.stdout
    again_cancel = run_cli(["cancel", str(path)], timeout=120)
    assert again_cancel.returncode == 0 and "nothing to cancel" in again_cancel.stdout
    # A later run resumes the cancelled run from its last checkpoint and trains the other from scratch.
    saved = last_saved((first / "train.log").read_text())
    target = newest_checkpoint(first / "checkpoints") + 4
    again = run_cli(["run", str(path), f"budget.max_update={target}", "resources.parallel=2"], timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "2 to launch" in again.stdout
    result = json.loads((first / "result.json").read_text())
    assert result["state"] == "finished" and result["attempts"] == 2 and result["updates"] == target, result
    loaded = re.findall(r"Loaded checkpoint \S+ \(epoch \d+ @ (\d+) updates\)", (first / "train.log").read_text())
    assert loaded and int(loaded[-1]) >= saved, loaded
    other = json.loads((sweep_dir / "clustered_s1" / "result.json").read_text())
    assert other["state"] == "finished" and other["attempts"] == 1 and other["updates"] == target


def test_truncated_last_checkpoint_is_restored_from_the_newest_intact_one(tmp_path):
    import torch

    from slurm.job import repair_last_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert repair_last_checkpoint(folder) is None  # nothing to resume: nothing to do
    torch.save({"updates": 8}, folder / "checkpoint_1_8.pt")
    torch.save({"updates": 4}, folder / "checkpoint_best.pt")
    os.utime(folder / "checkpoint_best.pt", (time.time() + 5, time.time() + 5))  # newer, but a best one
    whole = (folder / "checkpoint_1_8.pt").read_bytes()
    (folder / "checkpoint_last.pt").write_bytes(whole)
    assert repair_last_checkpoint(folder) is None  # intact: left alone
    (folder / "checkpoint_last.pt").write_bytes(whole[: len(whole) // 2])  # a copy killed half-way
    note = repair_last_checkpoint(folder)
    assert note and "restored from checkpoint_1_8.pt" in note, note
    assert torch.load(folder / "checkpoint_last.pt") == {"updates": 8}
    assert (folder / "checkpoint_last.pt.broken").stat().st_size == len(whole) // 2
    assert not list(folder.glob("*.tmp"))


def test_a_sweep_file_means_the_same_from_any_working_directory(tmp_path, corpus):
    """Relative paths in a sweep file (root, data.path, data.prepare) start from the sweep file's
    directory; {repo} is this repository. Launched from an unrelated directory."""
    import yaml

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    spec = yaml.safe_load(tiny_sweep(tmp_path / "t.yaml", corpus, name="rel", grid={"arch": ["clustered_transformer"]},
                                     budget={"max_update": 2}).read_text())  # fmt: skip
    spec["root"] = "out/sweeps"
    spec["data"] = {"path": "data/data-bin", "prepare": "{python} {repo}/experiments/prepare_demo_data.py --out data --lines 200"}
    (project / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([PY, "-m", "slurm", "run", str(project / "sweep.yaml")], cwd=elsewhere, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (project / "data" / "data-bin" / "dict.txt").is_file()
    result = json.loads((project / "out" / "sweeps" / "rel" / "clustered_s1" / "result.json").read_text())
    assert result["state"] == "finished" and result["updates"] == 2
    assert not list(elsewhere.iterdir()), list(elsewhere.iterdir())  # nothing written where it was launched


def test_the_demo_sweep_resolves_into_the_repository_from_anywhere(tmp_path):
    proc = subprocess.run([PY, "-m", "slurm", "run", str(REPO / "experiments" / "demo.yaml"), "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{REPO}/outputs/demo-data/data-bin --task masked_lm" in proc.stdout
    assert f"--save-dir {REPO}/outputs/sweeps/demo/softmax_s1/checkpoints" in proc.stdout


def test_run_without_fairseq_is_one_line(tmp_path, corpus):
    """fairseq-sweep run from a Python that cannot import fairseq: one line, exit 2."""
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="nofs")
    code = ("import sys; sys.modules['fairseq'] = None  # as if not installed\n"
            f"from slurm.cli import main; sys.exit(main(['run', {str(path)!r}]))")  # fmt: skip
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fairseq-sweep: error: fairseq is not importable") and "scripts/setup.sh" in line, line
    assert not (tmp_path / "sweeps").exists()


def test_cancel_of_a_job_that_just_ended_is_not_a_traceback(tmp_path, corpus, monkeypatch, capsys):
    """The race: a local job found alive ends before cancel signals it."""
    from slurm import backends
    from slurm import cancel as cancel_mod
    from slurm.runs import record_jobs

    sweep = load(tiny_sweep(tmp_path / "s.yaml", corpus, name="race", grid={"arch": ["softmax_transformer"]}))
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    sweep.dir.mkdir(parents=True)
    record_jobs(sweep, {"softmax_s1": {"cluster": "local", "job_id": dead.pid, "submitted": time.time()}})
    monkeypatch.setattr(backends, "controller_alive", lambda sweep, job_id: True)  # alive when checked
    assert cancel_mod.cancel(sweep, sweep.runs(), timeout_s=2) in (0, 1)
    assert f"the local job {dead.pid} of softmax_s1 had already ended" in capsys.readouterr().out
