"""Where jobs run: one :class:`Backend` per ``--cluster`` (local, slurm, debug), chosen once by name.

A backend fills a few hooks around submitit (whose own layering, an abstract executor with
backends that fill small hooks, is the model): the executor for a resource set, how many jobs may
start now, submission, when a job is done and how it ended, the scheduler's states of recorded jobs
(and which of them are alive or still queued), cancellation, the poll interval, and where a job's
own log lives. Everything SLURM-specific (``squeue``, ``sacct`` through submitit, ``scancel``, the
state vocabulary) is in :class:`SlurmBackend`; nothing outside this module asks which backend it
has.

- ``local``: real subprocesses through submitit's ``LocalExecutor``, at most ``parallel`` at a time.
- ``slurm``: one job array per resource set, all submitted at once; the jobs outlive the launch.
- ``debug``: every job in this process, one after another, as a single task. submitit's own
  ``DebugJob.results()``/``done()`` drop into pdb on any exception; this backend runs the
  submission itself instead, so a failed run is recorded and reported like on any other backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, cast

import submitit
from submitit.local.debug import DebugJob

from .job import TrainJob
from .runs import log
from .spec import Resources, Sweep

Job = submitit.Job[Any]


def _call(job: Callable[[], Any]) -> Any:
    """Run ``job``. Only for jobs pickled by earlier versions, which submitted ``_call(job)``: a job
    is now submitted as itself, since submitit checkpoints and requeues it on a time-limit or
    preemption signal only when the submitted callable is the Checkpointable (``TrainJob``)."""
    return job()


def _last_line(text: object) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class SubmissionError(RuntimeError):
    """The scheduler refused a submission (its error, one line)."""


class Backend(ABC):
    """The hooks a launch, ``status`` and ``cancel`` use; one subclass per ``--cluster``."""

    name: ClassVar[str]
    poll_s: ClassVar[float] = 1.0  # how often a waiting launch looks at its jobs
    detached: ClassVar[bool] = False  # jobs outlive the launch: `run` returns once submitted unless --wait
    batch: ClassVar[str] = "jobs"  # what one resource set goes out as (dry-run headers)
    scheduler: ClassVar[str] = "the scheduler"  # who holds a queued job (progress lines)

    # -- submission -----------------------------------------------------------------------------
    @abstractmethod
    def executor(self, sweep: Sweep, resources: Resources) -> submitit.Executor:
        """A submitit executor for jobs of ``resources``; its files go to ``<sweep>/submitit/``."""

    def slots(self, parallel: int, running: int) -> int:
        """How many more jobs may start now, with ``running`` of this launch still going."""
        return max(0, parallel - running)

    def submit(self, sweep: Sweep, resources: Resources, jobs: Sequence[TrainJob]) -> list[Job]:
        """Submit ``jobs`` (all of ``resources``); one handle each, in order."""
        executor = self.executor(sweep, resources)
        return [executor.submit(job) for job in jobs]  # the TrainJob itself: submitit checkpoints it

    # -- waiting --------------------------------------------------------------------------------
    def done(self, handle: Job) -> bool:
        return bool(handle.done())

    def error(self, handle: Job) -> BaseException | None:
        """After :meth:`done`: the job's exception (None when it returned)."""
        try:
            handle.results()
        except Exception as err:  # noqa: BLE001  (one failed run must not stop the others)
            return err
        return None

    def job_log(self, handle: Job) -> Path | None:
        """The job's own stderr (submitit's), where a scheduler kill is explained."""
        paths = getattr(handle, "paths", None)
        return Path(paths.stderr) if paths is not None else None

    def stop(self, handles: Sequence[Job], timeout_s: float = 60.0) -> bool:
        """On Ctrl-C/SIGTERM: stop this launch's own jobs (True), or leave them running (False)."""
        for handle in handles:
            handle.cancel(check=False)
        return True

    # -- states of recorded jobs (jobs.json), for status, run and cancel -------------------------
    @abstractmethod
    def states(self, sweep: Sweep, job_ids: Sequence[str]) -> dict[str, str]:
        """The scheduler's state of each job it still knows (missing: unknown)."""

    def alive(self, state: str | None, submitted: float | None = None) -> bool:
        """Whether a job in ``state`` is queued or running (``submitted``: when it was submitted)."""
        return state == "RUNNING"

    def queued(self, state: str) -> bool:
        """Waiting for the scheduler rather than running."""
        return False

    @abstractmethod
    def cancel(self, sweep: Sweep, jobs: Sequence[tuple[str, str]]) -> bool:
        """Ask the (run id, job id) ``jobs`` to stop; False when the request itself could not be made."""


class LocalBackend(Backend):
    name = "local"
    poll_s = 0.5

    def __init__(self) -> None:
        self._executors: dict[Resources, submitit.LocalExecutor] = {}

    def executor(self, sweep: Sweep, resources: Resources) -> submitit.Executor:
        if resources not in self._executors:  # LocalExecutor directly: AutoExecutor does not pass signal_delay_s
            executor = submitit.LocalExecutor(folder=sweep.dir / "submitit" / "%j")
            params: dict[str, Any] = {"timeout_min": resources.time_min, "tasks_per_node": resources.tasks,
                                      "signal_delay_s": resources.signal_delay_s}  # fmt: skip
            if resources.gpus_per_node:
                params["gpus_per_node"] = resources.gpus_per_node
            executor.update_parameters(**params)
            self._executors[resources] = executor
        return self._executors[resources]

    def submit(self, sweep: Sweep, resources: Resources, jobs: Sequence[TrainJob]) -> list[Job]:
        handles = super().submit(sweep, resources, jobs)
        for job, handle in zip(jobs, handles):
            log(f"started {job.spec.run_id} as job {handle.job_id} (local, {describe(resources)})")
        return handles

    def stop(self, handles: Sequence[Job], timeout_s: float = 60.0) -> bool:
        super().stop(handles)  # SIGINT to each job's controller, which then stops its tasks
        deadline = time.time() + timeout_s
        for handle in handles:
            while not handle.done() and time.time() < deadline:
                time.sleep(0.2)
        return True

    def states(self, sweep: Sweep, job_ids: Sequence[str]) -> dict[str, str]:
        return {job_id: "RUNNING" if controller_alive(sweep, job_id) else "GONE" for job_id in job_ids}

    def cancel(self, sweep: Sweep, jobs: Sequence[tuple[str, str]]) -> bool:
        for run_id, job_id in jobs:
            try:
                os.kill(int(job_id), signal.SIGINT)  # submitit's controller: SIGINT, then SIGKILL its tasks
                log(f"sent SIGINT to the local job {job_id} of {run_id}")
            except ProcessLookupError:  # it ended between the liveness check and now
                log(f"the local job {job_id} of {run_id} had already ended")
        return True


def controller_alive(sweep: Sweep, job_id: str) -> bool:
    """Whether ``job_id`` (a pid) is still this sweep's submitit local controller (checked by its
    command line, so that a recycled pid is never taken for it)."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return False
    return "submitit.local._local" in cmdline and str(sweep.dir / "submitit") in cmdline


class DebugBackend(Backend):
    name = "debug"
    poll_s = 0.0

    def __init__(self) -> None:
        self._errors: dict[str, BaseException | None] = {}
        self._noted: set[Resources] = set()

    def executor(self, sweep: Sweep, resources: Resources) -> submitit.Executor:
        executor = submitit.AutoExecutor(folder=sweep.dir / "submitit" / "%j", cluster="debug")
        executor.update_parameters(timeout_min=resources.time_min, nodes=resources.nodes, tasks_per_node=resources.tasks,
                                   cpus_per_task=resources.cpus_per_task, name=f"sweep-{sweep.name}")  # fmt: skip
        return executor

    def slots(self, parallel: int, running: int) -> int:
        return 0 if running else 1  # one after another, in this process

    def submit(self, sweep: Sweep, resources: Resources, jobs: Sequence[TrainJob]) -> list[Job]:
        if resources.tasks > 1 and resources not in self._noted:
            self._noted.add(resources)
            log(f"debug: each job runs as ONE task in this process ({resources.tasks} tasks/node ignored)")
        handles = super().submit(sweep, resources, jobs)
        for job, handle in zip(jobs, handles):
            log(f"running {job.spec.run_id} in this process (debug job {handle.job_id}); log: "
                f"{job.spec.run_dir / 'train.log'}")  # fmt: skip
        return handles

    def done(self, handle: Job) -> bool:
        """Runs the job, here and now, the first time it is asked."""
        if handle.job_id not in self._errors:
            saved = os.environ.get("SUBMITIT_DEBUG_JOB_ID")
            os.environ["SUBMITIT_DEBUG_JOB_ID"] = str(handle.job_id)  # what DebugJob.results() sets
            try:
                cast(DebugJob[Any], handle).submission().result()  # not results(): that one calls pdb
                self._errors[handle.job_id] = None
            except Exception as err:  # noqa: BLE001
                self._errors[handle.job_id] = err
            finally:
                if saved is None:
                    os.environ.pop("SUBMITIT_DEBUG_JOB_ID", None)
                else:
                    os.environ["SUBMITIT_DEBUG_JOB_ID"] = saved
        return True

    def error(self, handle: Job) -> BaseException | None:
        return self._errors.get(handle.job_id)

    def states(self, sweep: Sweep, job_ids: Sequence[str]) -> dict[str, str]:
        return {}  # its jobs live and die with the launch, which cancel stops by its lock

    def cancel(self, sweep: Sweep, jobs: Sequence[tuple[str, str]]) -> bool:
        return True


SIGNAL_EARLY_S = 60  # how much earlier than signal_delay_s SLURM may send the USR2 (sbatch --signal)
SIGNAL_START_S = 10  # the least time a job must have to start before that USR2 can come


class SlurmBackend(Backend):
    name = "slurm"
    poll_s = 2.0
    detached = True
    batch = "one job array"
    scheduler = "SLURM"
    # Job states (squeue/sacct) of a job that is queued or running; a state's first word counts.
    ALIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                       "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"})  # fmt: skip
    QUEUED = frozenset({"PENDING", "REQUEUED", "CONFIGURING", "UNKNOWN", "READY"})
    SACCT_LAG_S = 60  # a job submitted this recently that sacct does not list yet is taken as queued

    def __init__(self, max_num_timeout: int = 3) -> None:
        self.max_num_timeout = max_num_timeout  # requeues after a time limit before the job fails (submitit's 3)

    def executor(self, sweep: Sweep, resources: Resources) -> submitit.Executor:
        executor = submitit.AutoExecutor(folder=sweep.dir / "submitit" / "%j", cluster="slurm",
                                         slurm_max_num_timeout=self.max_num_timeout)  # fmt: skip
        params: dict[str, Any] = {
            "timeout_min": resources.time_min, "nodes": resources.nodes, "tasks_per_node": resources.tasks,
            "cpus_per_task": resources.cpus_per_task, "name": f"sweep-{sweep.name}", "mem_gb": resources.mem_gb,
            "slurm_signal_delay_s": resources.signal_delay_s,
        }  # fmt: skip
        if resources.gpus_per_node:
            params["gpus_per_node"] = resources.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(resources, key):
                params[f"slurm_{key}"] = getattr(resources, key)
        executor.update_parameters(**params)
        return executor

    def slots(self, parallel: int, running: int) -> int:
        return sys.maxsize  # SLURM schedules: everything goes out at once

    def submit(self, sweep: Sweep, resources: Resources, jobs: Sequence[TrainJob]) -> list[Job]:
        # sbatch(1) --signal: "the signal may be sent up to 60 seconds earlier than specified". A USR2
        # that comes before submitit has installed its handler kills the job instead of requeueing it
        # (seen: time_min 1, signal_delay_s 50, USR2 half a second after the start).
        start_s = resources.time_min * 60 - resources.signal_delay_s - SIGNAL_EARLY_S
        if start_s < SIGNAL_START_S:
            need = -(-(resources.signal_delay_s + SIGNAL_EARLY_S + SIGNAL_START_S) // 60)
            raise SubmissionError(
                f"resources.signal_delay_s={resources.signal_delay_s} with time_min={resources.time_min}: SLURM may "
                f"send USR2 up to {SIGNAL_EARLY_S} s early, {max(start_s, 0)} s into the job, before it can catch it; "
                f"set time_min >= {need} or lower signal_delay_s"
            )
        try:
            handles = self.executor(sweep, resources).submit_array(list(jobs))  # TrainJobs: checkpointable
        except Exception as err:  # noqa: BLE001  (sbatch missing, a bad partition, ...)
            raise SubmissionError(f"could not submit {len(jobs)} run(s) ({describe(resources)}) to SLURM: "
                                  f"{_last_line(err) or type(err).__name__}") from None  # fmt: skip
        log(f"submitted job array {str(handles[0].job_id).split('_')[0]}: {len(jobs)} run(s) ({describe(resources)}): "
            + ", ".join(f"{job.spec.run_id}={h.job_id}" for job, h in zip(jobs, handles)))  # fmt: skip
        return handles

    def stop(self, handles: Sequence[Job], timeout_s: float = 60.0) -> bool:
        return False  # Ctrl-C on `run --wait` only stops watching; `fairseq-sweep cancel` stops the jobs

    def states(self, sweep: Sweep, job_ids: Sequence[str]) -> dict[str, str]:
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

    def alive(self, state: str | None, submitted: float | None = None) -> bool:
        word = (state or "UNKNOWN").split()[0]
        if word in self.ALIVE:
            return True
        return word == "UNKNOWN" and submitted is not None and time.time() - submitted < self.SACCT_LAG_S

    def queued(self, state: str) -> bool:
        return (state or "UNKNOWN").split()[0] in self.QUEUED

    def cancel(self, sweep: Sweep, jobs: Sequence[tuple[str, str]]) -> bool:
        ids = [job_id for _, job_id in jobs]
        if not ids:
            return True
        try:
            proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log(f"scancel {' '.join(ids)} could not run: {err}")
            return False
        log(f"scancel {' '.join(ids)}")
        if proc.returncode != 0:  # e.g. a job that ended meanwhile; the caller's wait tells what is left
            log(f"scancel said: {' | '.join(proc.stderr.strip().splitlines()[:3])}")
        return True


def squeue_states(job_ids: Sequence[str]) -> dict[str, str]:
    """The controller's state of each job it still knows (``squeue``); {} if squeue cannot answer."""
    cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(job_ids)}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:  # e.g. every id already purged: "Invalid job id specified"
        return {}
    wanted = set(job_ids)
    found = {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in wanted and state:
            found[job_id] = state
    return found


def describe(resources: Resources) -> str:
    """e.g. ``1 node x 2 tasks, 1 cpu/task, 4 GB, 60 min``."""
    res, tasks = resources, resources.tasks
    parts = [f"{res.nodes} node{'s' if res.nodes > 1 else ''} x {tasks} task{'s' if tasks > 1 else ''}"]
    if res.gpus_per_node:
        parts.append(f"{res.gpus_per_node} GPU/node")
    parts += [f"{res.cpus_per_task} cpu/task", f"{res.mem_gb} GB", f"{res.time_min} min"]
    parts += [f"{k} {getattr(res, k)}" for k in ("partition", "account", "qos", "constraint") if getattr(res, k)]
    return ", ".join(parts)


BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (LocalBackend, SlurmBackend, DebugBackend)}


def backend(name: str) -> Backend:
    """The backend called ``name`` (``--cluster``, or the ``cluster`` of a jobs.json entry): the one
    place that goes from a name to behaviour. Unknown: a one-line :class:`KeyError`."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise KeyError(f"unknown cluster {name!r} (known: {', '.join(BACKENDS)})") from None


def live_states(sweep: Sweep, jobs: dict[str, dict[str, Any]]) -> dict[str, tuple[Backend, str]]:
    """run id -> (its backend, the scheduler's state of its latest job) for the jobs.json ``jobs``
    whose scheduler still knows them (one query per backend; none when its client is missing)."""
    by_backend: dict[str, list[tuple[str, str]]] = {}
    for run_id, entry in jobs.items():
        if entry.get("cluster") in BACKENDS and entry.get("job_id") is not None:
            by_backend.setdefault(str(entry["cluster"]), []).append((run_id, str(entry["job_id"])))
    out: dict[str, tuple[Backend, str]] = {}
    for name, items in by_backend.items():
        chosen = backend(name)
        try:
            states = chosen.states(sweep, [job_id for _, job_id in items])
        except Exception:  # noqa: BLE001  (no SLURM client here: unknown)
            states = {}
        out.update({run_id: (chosen, states[job_id]) for run_id, job_id in items if states.get(job_id)})
    return out
