"""``fairseq-sweep cancel``: stop a sweep's live jobs and record them as cancelled (resumable).

1. A launch of the sweep that still runs local or debug jobs on this machine (it holds the sweep
   lock, which names its pid) gets SIGTERM: it cancels its running jobs, launches none of the
   queued ones, and exits.
2. SLURM jobs still queued or running (``squeue``, else ``sacct``) are marked in ``jobs.json``
   and ``scancel``-ed. A ``run --wait`` watching them sees them end and reports them as cancelled.
3. Local jobs left by a launch that died: their submitit controller gets SIGINT (after checking
   its command line, so a recycled pid is never signalled).

Then it waits until every job is gone and writes ``state: cancelled`` into each run's
``result.json`` (with the wall time and updates so far), unless the run finished or failed on its
own first; temporaries a killed writer left behind are removed. ``fairseq-sweep run`` later
resumes the cancelled runs from ``checkpoint_last.pt``.
"""

from __future__ import annotations

import os
import signal
import time

from .backends import Backend, backend, BACKENDS
from .launch import mark_cancelled
from .runs import CANCELLED, lock_holder, log, read_jobs, read_result, record_jobs
from .spec import Run, Sweep


def _wait_launch(sweep: Sweep, pid: int, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        holder = lock_holder(sweep)
        if holder is None or holder[0] != pid:
            return True
        time.sleep(0.5)
    return False


def cancel(sweep: Sweep, runs: list[Run], timeout_s: float = 120.0) -> int:
    """Cancel the live jobs of ``runs``; 0 when all are gone, 1 when some could not be confirmed."""
    t0 = time.time()
    holder = lock_holder(sweep)
    if holder and holder[1] in BACKENDS and not backend(holder[1]).detached:  # its jobs end with it
        pid = holder[0]
        log(f"asking the running launch (pid {pid}, {holder[1]}) to stop its jobs")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # it ended between the lock check and now
            log(f"the launch (pid {pid}) had already ended")
        if not _wait_launch(sweep, pid, timeout_s):
            log(f"the launch (pid {pid}) still holds {sweep.dir / '.lock'} after {timeout_s:.0f}s; "
                f"stop it yourself (kill {pid})")  # fmt: skip
            return 1
    jobs = read_jobs(sweep)
    backends: dict[str, Backend] = {}
    recorded: list[tuple[Run, Backend, str, float | None]] = []  # every recorded job (a result may be an earlier attempt's)
    for run in runs:
        entry = jobs.get(run.run_id) or {}
        name = entry.get("cluster")
        if name in BACKENDS and entry.get("job_id") is not None:
            chosen = backends.setdefault(name, backend(name))
            recorded.append((run, chosen, str(entry["job_id"]), entry.get("submitted")))
    states = _states(sweep, [(b, j) for _, b, j, _ in recorded])
    targets = [(run, b, j) for run, b, j, submitted in recorded
               if b.alive(states.get((b.name, j)), float(submitted) if submitted else None)]  # fmt: skip
    by_launch = [r for r in runs if float((read_result(sweep, r) or {}).get("cancelled_at") or 0) >= t0
                 and (read_result(sweep, r) or {}).get("state") == CANCELLED]  # fmt: skip
    for run in by_launch:
        log(f"cancelled {run.run_id} (stopped by its launch){_progress_of(sweep, run)}")
    if not targets:
        if not by_launch:
            log("nothing to cancel: no job of this sweep is queued or running")
        return 0
    record_jobs(sweep, {run.run_id: {"cancelled_at": time.time()} for run, _, _ in targets}, merge=True)
    for chosen in backends.values():
        if not chosen.cancel(sweep, [(run.run_id, j) for run, b, j in targets if b is chosen]):
            return 1
    remaining = list(targets)
    deadline, shown = time.time() + timeout_s, time.time()
    while remaining and time.time() < deadline:
        states = _states(sweep, [(b, j) for _, b, j in remaining])
        still = []
        for run, chosen, job_id in remaining:
            if chosen.alive(states.get((chosen.name, job_id))):
                still.append((run, chosen, job_id))
                continue
            mark_cancelled(sweep, run, job_id)
            state = (read_result(sweep, run) or {}).get("state")
            extra = "" if state == CANCELLED else f" (it had already {state} on its own)"
            log(f"cancelled {run.run_id} (job {job_id}){_progress_of(sweep, run)}{extra}")
        remaining = still
        if remaining and time.time() - shown > 10:
            log(f"waiting for {len(remaining)} job(s) to stop: " + ", ".join(j for _, _, j in remaining))
            shown = time.time()
        if remaining:
            time.sleep(1.0)
    if remaining:
        log(f"{len(remaining)} job(s) still alive after {timeout_s:.0f}s: "
            + ", ".join(f"{r.run_id} ({j})" for r, _, j in remaining))  # fmt: skip
        return 1
    log(f"{len(targets) + len(by_launch)} run(s) cancelled; `fairseq-sweep run {sweep.source}` resumes them")
    return 0


def _states(sweep: Sweep, jobs: list[tuple[Backend, str]]) -> dict[tuple[str, str], str]:
    """(backend name, job id) -> the scheduler's state, one query per backend."""
    out: dict[tuple[str, str], str] = {}
    for chosen in {b.name: b for b, _ in jobs}.values():
        ids = [j for b, j in jobs if b is chosen]
        out.update({(chosen.name, j): state for j, state in chosen.states(sweep, ids).items()})
    return out


def _progress_of(sweep: Sweep, run: Run) -> str:
    result = read_result(sweep, run) or {}
    if not result.get("attempts"):
        return ": it had not started"
    return f" at {result.get('updates', 0)} updates"
