"""Run directories, ``result.json`` and the sweep lock.

Layout (deterministic, so a requeued or re-launched job finds its own state):

    <root>/<sweep>/
        sweep.yaml            the resolved sweep as launched
        jobs.json             run id -> {cluster, job_id} of its latest submission
        .lock                 held (flock) by a launch while it submits / waits
        submitit/             submitit's pickles and per-job stdout/stderr
        tb/<run-id>/          TensorBoard: one tree per sweep (`tensorboard --logdir <sweep>/tb`)
        <run-id>/checkpoints/ checkpoint_last.pt (resume), checkpoint_best.pt
        <run-id>/train.log    fairseq's log (rank 0; train.rank<R>.log for other ranks)
        <run-id>/result.json  state, metrics, updates, wall time, GPU-hours, command, versions
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .spec import Run, Sweep

FINISHED, FAILED, RUNNING, REQUEUED, PENDING = "finished", "failed", "running", "requeued", "pending"


class LockedError(RuntimeError):
    pass


def run_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.dir / run.run_id


def tb_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.dir / "tb" / run.run_id


def write_json(path: Path, data: Any) -> None:
    """Atomic: write a temporary file in the same directory, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_result(sweep: Sweep, run: Run) -> dict | None:
    return read_json(run_dir(sweep, run) / "result.json")


def update_result(path: Path, **fields: Any) -> dict:
    data = read_json(path) or {}
    data.update(fields)
    write_json(path, data)
    return data


@contextlib.contextmanager
def sweep_lock(sweep: Sweep) -> Iterator[None]:
    """One launch per sweep at a time: a non-blocking flock on <sweep>/.lock (released on exit/crash)."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    path = sweep.dir / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LockedError(f"sweep {sweep.name!r} is being launched by {holder} (lock {path}); wait or cancel it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def jobs_file(sweep: Sweep) -> Path:
    return sweep.dir / "jobs.json"


def read_jobs(sweep: Sweep) -> dict:
    return read_json(jobs_file(sweep)) or {}


def record_jobs(sweep: Sweep, entries: dict[str, dict]) -> None:
    jobs = read_jobs(sweep)
    jobs.update(entries)
    write_json(jobs_file(sweep), jobs)
