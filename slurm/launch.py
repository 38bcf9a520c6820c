"""Submission and waiting: runs -> submitit jobs (on a :class:`~slurm.backends.Backend`) -> one
:class:`Outcome` per run.

The launch is the same on every backend: it submits as many runs as the backend takes now (all at
once on SLURM, one job array per resource set; ``parallel`` at a time locally; one at a time in
the debug backend), waits for them when asked (local and debug jobs always are), and classifies
each ending. While it waits it prints each run as it ends and a progress line every
``progress_s`` seconds.

A run's ending is classified by a pure function (:func:`classify`) from what its job left behind:
the result.json its job wrote, its jobs.json entry, the job's error and the scheduler's state. A
job that ended without writing its result (killed by the scheduler, cancelled) then gets an
honest ``result.json`` (:meth:`Launch._settle`): ``cancelled`` when ``fairseq-sweep cancel`` (or
Ctrl-C) asked for it, ``failed`` with the scheduler's state otherwise.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, Mapping

from .backends import Backend, Job, SubmissionError, _call, describe
from .job import TrainJob, parse_log
from .runs import (CANCELLED, FAILED, FINISHED, PENDING, REQUEUED, RUNNING, log, read_jobs, read_result, record_jobs,
                   remove_stale_temporaries, run_dir, tb_dir, update_result)  # fmt: skip
from .spec import Resources, Run, Sweep, job_spec

__all__ = ["Launch", "Outcome", "Verdict", "classify", "mark_cancelled", "resource_groups", "SubmissionError",
           "Interrupted", "interrupt_on_sigterm", "describe", "log", "_call"]  # fmt: skip

UNSETTLED = (None, PENDING, RUNNING, REQUEUED)  # result.json states a vanished job leaves behind
NOT_WAITED = "submitted"  # an outcome's state for a job submitted but not waited for
NOT_LAUNCHED = "not launched"


def settles(job_id: Any) -> Callable[[dict[str, Any]], bool]:
    """Whether a result.json may take the ending of job ``job_id``: it is unsettled, or it is an
    earlier job's (the job died before it could write its own)."""
    return lambda data: data.get("state") in UNSETTLED or str(data.get("job_id")) != str(job_id)


class Interrupted(BaseException):
    """Ctrl-C, or SIGTERM from ``fairseq-sweep cancel``, while a launch submits or waits."""


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` inside the block (``fairseq-sweep cancel`` stops a launch so)."""

    def handler(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Outcome:
    run: Run
    state: str  # finished / failed / cancelled / submitted (not waited for) / not launched
    reason: str = ""
    log: Path | None = None  # where to look first

    def line(self) -> str:
        where = f"; log: {self.log}" if self.log else ""
        return f"{self.state.upper()} {self.run.run_id}: {self.reason or self.state}{where}"


@dataclass(frozen=True)
class Ending:
    """What is known when a run's job has ended (gathered by the launch, read by :func:`classify`)."""

    job_id: str
    error: str | None  # the job's exception, None when it returned
    scheduler_state: str = ""
    train_log: Path | None = None  # fairseq's log, when it exists
    job_log: Path | None = None  # submitit's stderr of the job, wherever it is
    job_log_exists: bool = False


@dataclass(frozen=True)
class Verdict:
    """A run's classified ending: its outcome, and what (if anything) result.json must be told."""

    outcome: Outcome
    record: str | None = None  # None: result.json already says it; CANCELLED or FAILED: write that


def classify(run: Run, end: Ending, result: Mapping[str, Any], entry: Mapping[str, Any]) -> Verdict:
    """How a run's job ended, from its ``result.json`` content, its ``jobs.json`` ``entry`` and
    ``end``. Pure: reads and writes nothing."""
    log_path = end.train_log or end.job_log
    fresh = end.error is None or str(result.get("job_id")) == str(end.job_id)  # else an earlier job's result
    state = result.get("state") if fresh else None
    if end.error is None and state == FINISHED:
        return Verdict(Outcome(run, FINISHED, f"{result.get('updates')} updates", end.train_log))
    if state == FAILED:  # fairseq failed and the job said so: its log's last line is the error
        why = f"fairseq-train exit {result.get('exit_code')}: {_last_line(result.get('error'))}"
        return Verdict(Outcome(run, FAILED, why, log_path))
    if state in (FINISHED, CANCELLED):
        return Verdict(Outcome(run, str(state), "cancelled" if state == CANCELLED else "", log_path))
    if entry.get("cancelled_at"):
        return Verdict(Outcome(run, CANCELLED, "cancelled (fairseq-sweep cancel or Ctrl-C); `run` resumes it", log_path),
                       record=CANCELLED)  # fmt: skip
    first = _last_line(end.error) if end.error is not None else "no result"
    why = f"the job ended without a result (scheduler state {end.scheduler_state or 'unknown'}): {first}"
    return Verdict(Outcome(run, FAILED, why, end.job_log if end.job_log_exists else log_path), record=FAILED)


def resource_groups(runs: list[Run]) -> list[tuple[Resources, list[Run]]]:
    """Runs with identical resources, in order of first appearance: one job array each on SLURM."""
    groups: dict[Resources, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.resources, []).append(run)
    return list(groups.items())


def _last_line(text: object) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _fmt_s(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}h{whole // 60 % 60:02d}m" if whole >= 3600 else f"{whole // 60}m{whole % 60:02d}s"


class Launch:
    """Submits ``runs`` of ``sweep`` on ``backend`` and (optionally) waits; :meth:`go` returns outcomes."""

    def __init__(self, sweep: Sweep, runs: list[Run], backend: Backend, parallel: int, progress_s: float = 60.0):
        self.sweep, self.runs, self.backend = sweep, runs, backend
        self.parallel, self.progress_s = parallel, progress_s
        self.handles: dict[str, Job] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.started = time.time()
        self.interrupted = False

    # -- submission -----------------------------------------------------------------------------
    def _submit(self, queue: list[Run]) -> None:
        """Submit as many queued runs as the backend takes now (one call per resource set)."""
        take = min(len(queue), self.backend.slots(self.parallel, len(self.handles)))
        batch, queue[:] = queue[:take], queue[take:]
        for resources, runs in resource_groups(batch):
            jobs = [self._prepare(run) for run in runs]
            handles = self.backend.submit(self.sweep, resources, jobs)
            record_jobs(self.sweep, {run.run_id: {"cluster": self.backend.name, "job_id": h.job_id, "submitted": time.time()}
                                     for run, h in zip(runs, handles)})  # fmt: skip
            self.handles.update({run.run_id: handle for run, handle in zip(runs, handles)})

    def _prepare(self, run: Run) -> TrainJob:
        tb_dir(self.sweep, run).mkdir(parents=True, exist_ok=True)
        return TrainJob(job_spec(self.sweep, run))

    # -- outcomes -------------------------------------------------------------------------------
    def _ending(self, run: Run, handle: Job, error: BaseException | None) -> Ending:
        train_log = run_dir(self.sweep, run) / "train.log"
        job_log = self.backend.job_log(handle)
        return Ending(job_id=str(handle.job_id), error=None if error is None else str(error),
                      scheduler_state=str(getattr(handle, "state", "") or ""),
                      train_log=train_log if train_log.is_file() else None, job_log=job_log,
                      job_log_exists=bool(job_log and job_log.is_file()))  # fmt: skip

    def _settle(self, run: Run, error: BaseException | None) -> Outcome:
        """Classify how the run's job ended, then write what result.json lacks; log it."""
        handle = self.handles[run.run_id]
        end = self._ending(run, handle, error)
        verdict = classify(run, end, read_result(self.sweep, run) or {}, read_jobs(self.sweep).get(run.run_id, {}))
        if verdict.record == CANCELLED:
            mark_cancelled(self.sweep, run, handle.job_id)
        elif verdict.record == FAILED:
            rdir = run_dir(self.sweep, run)
            update_result(rdir / "result.json", when=settles(handle.job_id), state=FAILED, error=verdict.outcome.reason,
                          exit_code=None, job_id=handle.job_id,
                          job_log=str(end.job_log) if end.job_log else None)  # fmt: skip
            remove_stale_temporaries(rdir)
        return self._finish(run, verdict.outcome)

    def _finish(self, run: Run, outcome: Outcome) -> Outcome:
        self.outcomes[run.run_id] = outcome
        self.handles.pop(run.run_id, None)
        if outcome.state == FINISHED:
            log(f"finished {run.run_id} ({outcome.reason})")
        else:
            log(outcome.line())
        return outcome

    # -- waiting --------------------------------------------------------------------------------
    def _progress(self, queued: int) -> None:
        done = [o.state for o in self.outcomes.values()]
        parts = [f"{done.count(FINISHED)} finished"]
        if len(done) - done.count(FINISHED):
            parts.append(f"{len(done) - done.count(FINISHED)} failed/cancelled")
        running, pending = [], 0
        try:  # the controller's view (submitit's handle state, from sacct, lags behind it)
            live = self.backend.states(self.sweep, [str(h.job_id) for h in self.handles.values()])
        except Exception:  # noqa: BLE001
            live = {}
        runs = {run.run_id: run for run in self.runs}
        for run_id, handle in self.handles.items():
            state = (live.get(str(handle.job_id)) or str(getattr(handle, "state", "") or "UNKNOWN")).split()[0]
            if self.backend.queued(state):
                pending += 1
                continue
            updates = parse_log(run_dir(self.sweep, runs[run_id]) / "train.log")
            running.append(f"{run_id} @ {updates.get('updates', 0)} updates")
        if running:
            parts.append(f"{len(running)} running ({', '.join(running)})")
        if pending:
            parts.append(f"{pending} pending in {self.backend.scheduler}")
        if queued:
            parts.append(f"{queued} waiting for a free slot (parallel={self.parallel})")
        log(f"{_fmt_s(time.time() - self.started)}: " + ", ".join(parts))

    def _loop(self, queue: list[Run], wait: bool) -> None:
        last = time.time()
        while queue or self.handles:
            self._submit(queue)
            if not wait:
                return
            for run in [r for r in self.runs if r.run_id in self.handles]:
                handle = self.handles[run.run_id]
                if self.backend.done(handle):
                    self._settle(run, self.backend.error(handle))
            if time.time() - last >= self.progress_s and (queue or self.handles):
                self._progress(len(queue))
                last = time.time()
            if queue or self.handles:
                time.sleep(self.backend.poll_s)

    # -- interruption ---------------------------------------------------------------------------
    def _interrupted(self) -> None:
        live = [r for r in self.runs if r.run_id in self.handles]
        if not self.backend.stop([self.handles[r.run_id] for r in live]):  # SLURM: the jobs keep running
            for run in live:
                self.outcomes[run.run_id] = Outcome(run, NOT_WAITED, f"still in {self.backend.scheduler}")
            log(f"stopped waiting; {len(live)} job(s) keep running in {self.backend.scheduler} "
                f"(fairseq-sweep status / fairseq-sweep cancel {self.sweep.source})")  # fmt: skip
            return
        if live:  # what classify reads: the launch cancelled these
            record_jobs(self.sweep, {r.run_id: {"cancelled_at": time.time()} for r in live}, merge=True)
        for run in live:
            self._settle(run, RuntimeError("interrupted"))

    def go(self, wait: bool) -> list[Outcome]:
        """Submit (and wait when asked; a backend whose jobs do not outlive the launch always
        waits); outcomes in run order.

        Ctrl-C or SIGTERM (see :func:`interrupt_on_sigterm`) ends it early and sets ``interrupted``:
        the backend then stops this launch's jobs (resumable) or, on SLURM, leaves them running."""
        queue: list[Run] = list(self.runs)
        try:
            self._loop(queue, wait or not self.backend.detached)
        except (Interrupted, KeyboardInterrupt):
            self.interrupted = True
            log("interrupted")
            self._interrupted()
            for run in queue:
                self.outcomes[run.run_id] = Outcome(run, NOT_LAUNCHED, "the launch was interrupted before it")
        for run in self.runs:
            if run.run_id not in self.outcomes and run.run_id in self.handles:
                self.outcomes[run.run_id] = Outcome(run, NOT_WAITED, f"job {self.handles[run.run_id].job_id}")
        return [self.outcomes[r.run_id] for r in self.runs if r.run_id in self.outcomes]


def mark_cancelled(sweep: Sweep, run: Run, job_id: Any) -> dict[str, Any]:
    """After job ``job_id`` of the run is gone: ``cancelled`` in result.json (unless it ended on its
    own first), with the interrupted attempt's wall time and the metrics logged so far; stale
    temporaries removed."""
    rdir = run_dir(sweep, run)
    now = time.time()
    previous = read_result(sweep, run) or {}
    fields: dict[str, Any] = {"state": CANCELLED, "cancelled_at": now, "error": None, "exit_code": None,
                              "run_id": run.run_id, "job_id": job_id}  # fmt: skip
    started = previous.get("attempt_started_at")
    if previous.get("state") == RUNNING and str(previous.get("job_id")) == str(job_id) and started:
        wall = float(previous.get("wall_time_s") or 0.0) + now - float(started)
        gpus = int(previous.get("gpus") or 0)
        fields.update(wall_time_s=round(wall, 2), gpu_hours=round(wall * gpus / 3600, 6))
    metric = sweep.metric
    fields.update({k: v for k, v in parse_log(rdir / "train.log", metric.name, metric.split,
                                              metric.lower_is_better).items() if v is not None})  # fmt: skip
    data = update_result(rdir / "result.json", when=settles(job_id), **fields)
    remove_stale_temporaries(rdir)
    return data
