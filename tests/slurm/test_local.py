"""The launcher on submitit's local executor (real subprocesses): runs, idempotency, lock, report."""

from __future__ import annotations

import csv
import json
import re

import pytest

from slurm.runs import LockedError, sweep_lock, write_json
from slurm.spec import load

from .conftest import run_cli, tiny_sweep


def test_local_sweep_runs_reports_and_is_idempotent(tmp_path, corpus):
    # Two arms plus one that fails inside fairseq (an architecture option fairseq rejects).
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="loc", grid={"arch": ["softmax_transformer", "clustered_transformer"]},
                      arms=[{"name": "ok"}, {"name": "bad", "hash_bits": 64}])  # fmt: skip
    proc = run_cli(["run", str(path), "resources.parallel=2"], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "loc"
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
    assert "FAILED bad_softmax_s1" in proc.stdout
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
