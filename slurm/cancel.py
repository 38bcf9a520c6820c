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
import subprocess
import time
from pathlib import Path

from .launch import log, mark_cancelled, squeue_states
from .runs import CANCELLED, lock_holder, read_jobs, read_result, record_jobs
from .spec import Run, Sweep

ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "RESIZING",
         "SUSPENDED", "SIGNALING", "STAGE_OUT"}  # fmt: skip
SACCT_LAG_S = 60  # a job submitted this recently and not yet in sacct is taken as queued


def slurm_states(sweep: Sweep, job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job id (array tasks included).

    ``sacct`` (through submitit's watcher) knows every job, but lags behind the controller: for
    a while after a job starts it may not list it at all, or still call it PENDING. ``squeue``
    asks the controller itself, which knows the jobs it has not yet purged (``MinJobAge``), so
    its answer wins where it has one; sacct answers for the rest.
    """
    if not job_ids:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher(delay_s=0)
    for job_id in job_ids:
        watcher.register_job(str(job_id))
    watcher.update()
    states = {str(j): watcher.get_state(str(j), mode="cache") for j in job_ids}
    states.update(squeue_states([str(j) for j in job_ids]))
    return states


def is_alive(state: str | None) -> bool:
    return bool(state) and state.split()[0] in ALIVE


def local_controller_alive(sweep: Sweep, job_id: str) -> bool:
    """Whether ``job_id`` (a pid) is still this sweep's submitit local controller."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return False
    return "submitit.local._local" in cmdline and str(sweep.dir / "submitit") in cmdline


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
    if holder and holder[1] in ("local", "debug"):
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
    live: dict[str, tuple[Run, dict]] = {}
    for run in runs:  # every recorded job is checked (a result.json may be an earlier attempt's)
        entry = jobs.get(run.run_id)
        if entry and entry.get("cluster") in ("slurm", "local"):
            live[run.run_id] = (run, entry)
    slurm_ids = [str(e["job_id"]) for _, e in live.values() if e.get("cluster") == "slurm"]
    states = slurm_states(sweep, slurm_ids)
    targets: list[tuple[Run, dict]] = []
    for run, entry in live.values():
        cluster, job_id = entry.get("cluster"), str(entry.get("job_id"))
        if cluster == "slurm":
            state = (states.get(job_id) or "UNKNOWN").split()[0]
            fresh = time.time() - float(entry.get("submitted") or 0) < SACCT_LAG_S  # sacct may not list it yet
            if is_alive(state) or (state == "UNKNOWN" and fresh):
                targets.append((run, entry))
        elif cluster == "local" and local_controller_alive(sweep, job_id):
            targets.append((run, entry))
    by_launch = [r for r in runs if float((read_result(sweep, r) or {}).get("cancelled_at") or 0) >= t0
                 and (read_result(sweep, r) or {}).get("state") == CANCELLED]  # fmt: skip
    for run in by_launch:
        log(f"cancelled {run.run_id} (stopped by its launch){_progress_of(sweep, run)}")
    if not targets:
        if not by_launch:
            log("nothing to cancel: no job of this sweep is queued or running")
        return 0
    record_jobs(sweep, {run.run_id: {"cancelled_at": time.time()} for run, _ in targets}, merge=True)
    ids = [str(e["job_id"]) for _, e in targets if e["cluster"] == "slurm"]
    if ids:
        try:
            proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log(f"scancel {' '.join(ids)} could not run: {err}")
            return 1
        log(f"scancel {' '.join(ids)}")
        if proc.returncode != 0:  # e.g. a job that ended meanwhile; the wait below tells what is left
            log(f"scancel said: {' | '.join(proc.stderr.strip().splitlines()[:3])}")
    for run, entry in targets:
        if entry["cluster"] == "local":
            try:
                os.kill(int(entry["job_id"]), signal.SIGINT)  # submitit's controller: SIGINT, then SIGKILL its tasks
                log(f"sent SIGINT to the local job {entry['job_id']} of {run.run_id}")
            except ProcessLookupError:  # it ended between the liveness check and now
                log(f"the local job {entry['job_id']} of {run.run_id} had already ended")
    remaining = list(targets)
    deadline, shown = time.time() + timeout_s, time.time()
    while remaining and time.time() < deadline:
        states = slurm_states(sweep, [str(e["job_id"]) for _, e in remaining if e["cluster"] == "slurm"])
        still = []
        for run, entry in remaining:
            job_id = str(entry["job_id"])
            alive = is_alive(states.get(job_id)) if entry["cluster"] == "slurm" else local_controller_alive(sweep, job_id)
            if alive:
                still.append((run, entry))
                continue
            mark_cancelled(sweep, run, job_id)
            state = (read_result(sweep, run) or {}).get("state")
            extra = "" if state == CANCELLED else f" (it had already {state} on its own)"
            log(f"cancelled {run.run_id} (job {job_id}){_progress_of(sweep, run)}{extra}")
        remaining = still
        if remaining and time.time() - shown > 10:
            log(f"waiting for {len(remaining)} job(s) to stop: " + ", ".join(str(e["job_id"]) for _, e in remaining))
            shown = time.time()
        if remaining:
            time.sleep(1.0)
    if remaining:
        log(f"{len(remaining)} job(s) still alive after {timeout_s:.0f}s: "
            + ", ".join(f"{r.run_id} ({e['job_id']})" for r, e in remaining))  # fmt: skip
        return 1
    log(f"{len(targets) + len(by_launch)} run(s) cancelled; `fairseq-sweep run {sweep.source}` resumes them")
    return 0


def _progress_of(sweep: Sweep, run: Run) -> str:
    result = read_result(sweep, run) or {}
    if not result.get("attempts"):
        return ": it had not started"
    return f" at {result.get('updates', 0)} updates"
