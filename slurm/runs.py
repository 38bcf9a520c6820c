"""Run directories, ``result.json`` and the sweep lock.

Layout (deterministic, so a requeued or re-launched job finds its own state):

    <root>/<sweep>/
        sweep.json            the resolved sweep as last launched (source file and config)
        jobs.json             run id -> {cluster, job_id, submitted[, cancelled_at]} of its latest submission
        .lock                 held (flock) by a launch while it submits / waits; names its pid
        submitit/             submitit's pickles and per-job stdout/stderr
        tb/<run-id>/          TensorBoard: one tree per sweep (`tensorboard --logdir <sweep>/tb`)
        <run-id>/checkpoints/ checkpoint_last.pt (resume), checkpoint_best.pt
        <run-id>/train.log    fairseq's log (rank 0; train.rank<R>.log for other ranks)
        <run-id>/result.json  state, metrics, updates, wall time, GPU-hours, command, versions

``result.json`` and ``jobs.json`` are replaced atomically (temporary file + rename) and updated
under an flock (``.<name>.lock`` beside them), because a job, a launch and ``cancel`` may all
update them at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .spec import Run, Sweep

FINISHED, FAILED, RUNNING, REQUEUED, PENDING = "finished", "failed", "running", "requeued", "pending"
CANCELLED = "cancelled"


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class LockedError(RuntimeError):
    pass


def log(message: str) -> None:
    """A line of the launcher's own output (``[sweep] ...``)."""
    print(f"[sweep] {message}", flush=True)


def run_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.run_dir(run)


def tb_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.tb_dir(run)


def write_json(path: Path, data: Any) -> None:
    """Atomic: write a temporary file in the same directory, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it 0600: results are for the whole team to read
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


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_result(sweep: Sweep, run: Run) -> dict[str, Any] | None:
    return read_json(run_dir(sweep, run) / "result.json")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """A blocking flock on ``.<name>.lock`` beside ``path`` (released by the kernel if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_result(path: Path, when: Callable[[dict[str, Any]], bool] | None = None, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the JSON file at ``path`` (atomic, locked).

    ``when``: a test of the current content; when it fails the file is left alone (a job that
    finished on its own is not overwritten by a late cancel). Returns the content afterwards.
    """
    with file_lock(path):
        data = read_json(path) or {}
        if when is not None and not when(data):
            return data
        data.update(fields)
        write_json(path, data)
        return data


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files a killed writer left behind (ours: ``.result.json.*``; fairseq's ``*.pt.tmp``)."""
    stale = [p for p in folder.glob(".*.json.*") if not p.name.endswith(".lock")]
    stale += list((folder / "checkpoints").glob("*.tmp"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


@contextlib.contextmanager
def sweep_lock(sweep: Sweep, cluster: str = "local") -> Iterator[None]:
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
    handle.write(f"pid {os.getpid()} on {os.uname().nodename} ({cluster})\n")  # read by lock_holder()
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def lock_holder(sweep: Sweep) -> tuple[int, str] | None:
    """(pid, cluster) of the launch holding the sweep's lock on this machine; None when nobody does."""
    path = sweep.dir / ".lock"
    if not path.is_file():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            words = handle.read().split()
            if len(words) >= 5 and words[0] == "pid" and words[3] == os.uname().nodename:
                return int(words[1]), words[4].strip("()")
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def jobs_file(sweep: Sweep) -> Path:
    return sweep.dir / "jobs.json"


def read_jobs(sweep: Sweep) -> dict[str, dict[str, Any]]:
    return read_json(jobs_file(sweep)) or {}


def record_jobs(sweep: Sweep, entries: dict[str, dict[str, Any]], merge: bool = False) -> None:
    """Set (or with ``merge``, update) the jobs.json entries of some runs."""
    with file_lock(jobs_file(sweep)):
        jobs = read_jobs(sweep)
        for run_id, entry in entries.items():
            jobs[run_id] = {**jobs.get(run_id, {}), **entry} if merge else entry
        write_json(jobs_file(sweep), jobs)
