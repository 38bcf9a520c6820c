"""Submission and waiting: runs -> submitit jobs -> one :class:`Outcome` per run.

- ``slurm``: one job array per distinct resource set (an arm may override ``resources``), all
  submitted at once; with ``wait`` the launch then polls them (``sacct`` through submitit).
- ``local``: real subprocesses through submitit's ``LocalExecutor``, at most ``parallel`` jobs at a
  time; always waited for.
- ``debug``: every job in this process, one after another (submitit's debug executor supplies
  the job environment, a world of one task). submitit's own ``DebugJob.results()`` drops into pdb
  on any exception; the launcher runs the submission itself instead, so a failed run is recorded
  and reported like on any other executor and the launch goes on (the failure is in fairseq's
  ``train.log`` anyway: fairseq-train is a subprocess, a post-mortem of the launcher shows nothing).

While it waits the launch prints each run as it ends and a progress line every ``progress_s``
seconds. A run whose job ended without writing its result (killed by the scheduler, cancelled)
gets an honest ``result.json``: ``cancelled`` when ``fairseq-sweep cancel`` (or Ctrl-C) asked for
it, ``failed`` with the scheduler's state otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .job import REPO, TrainJob, fairseq_train_path, parse_log
from .runs import (CANCELLED, FAILED, FINISHED, PENDING, REQUEUED, RUNNING, read_jobs, read_result, record_jobs,
                   remove_stale_temporaries, run_dir, tb_dir, update_result)  # fmt: skip
from .spec import Run, Sweep, fairseq_argv

UNSETTLED = (None, PENDING, RUNNING, REQUEUED)  # result.json states a vanished job leaves behind


def settles(job_id: Any) -> Callable[[dict], bool]:
    """Whether a result.json may take the ending of job ``job_id``: it is unsettled, or it is an
    earlier job's (the job died before it could write its own)."""
    return lambda data: data.get("state") in UNSETTLED or str(data.get("job_id")) != str(job_id)
POLL_S = {"local": 0.5, "slurm": 2.0}


def log(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


class SubmissionError(RuntimeError):
    """The scheduler refused a submission (sbatch's error, one line)."""


class Interrupted(BaseException):
    """Ctrl-C, or SIGTERM from ``fairseq-sweep cancel``, while a launch submits or waits."""


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` inside the block (``fairseq-sweep cancel`` stops a launch so)."""

    def handler(signum, frame):  # noqa: ARG001
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Outcome:
    run: Run
    state: str  # finished / failed / cancelled / submitted (not waited for) / not launched
    reason: str = ""
    log: Path | None = None  # where to look first

    def line(self) -> str:
        where = f"; log: {self.log}" if self.log else ""
        return f"{self.state.upper()} {self.run.run_id}: {self.reason or self.state}{where}"


def job_spec(sweep: Sweep, run: Run) -> dict[str, Any]:
    rdir, tdir = run_dir(sweep, run), tb_dir(sweep, run)
    res = run.resources or sweep.resources
    return {
        "run_id": run.run_id, "arm": run.arm, "seed": run.seed, "attention": run.attention, "args": run.args,
        "run_dir": str(rdir), "fairseq_train": fairseq_train_path(),
        "argv": fairseq_argv(sweep, run, rdir, tdir, REPO / "fairseq_plugin"),
        "gpus": res["gpus_per_node"] * res["nodes"], "threads": res["cpus_per_task"],
        "resources": {k: v for k, v in res.items() if k != "parallel"},
        "metric": {"metric": sweep.metric["name"], "split": sweep.metric["split"],
                   "lower_is_better": sweep.metric["lower_is_better"]},
    }  # fmt: skip


def tasks_of(resources: dict) -> int:
    return resources["gpus_per_node"] or resources["tasks_per_node"]  # one task per GPU


def make_executor(sweep: Sweep, cluster: str, resources: dict | None = None):
    import submitit

    res = resources or sweep.resources
    folder = sweep.dir / "submitit" / "%j"
    if cluster == "local":  # LocalExecutor directly: AutoExecutor does not pass signal_delay_s
        executor = submitit.LocalExecutor(folder=folder)
        params: dict[str, Any] = {"timeout_min": res["time_min"], "tasks_per_node": tasks_of(res),
                                  "signal_delay_s": res["signal_delay_s"]}  # fmt: skip
        if res["gpus_per_node"]:
            params["gpus_per_node"] = res["gpus_per_node"]
        executor.update_parameters(**params)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = {"timeout_min": res["time_min"], "nodes": res["nodes"], "tasks_per_node": tasks_of(res),
              "cpus_per_task": res["cpus_per_task"], "name": f"sweep-{sweep.name}"}  # fmt: skip
    if res["gpus_per_node"]:
        params["gpus_per_node"] = res["gpus_per_node"]
    if cluster == "slurm":
        params["mem_gb"] = res["mem_gb"]
        params["slurm_signal_delay_s"] = res["signal_delay_s"]
        for key in ("partition", "account", "qos", "constraint"):
            if res[key]:
                params[f"slurm_{key}"] = res[key]
    executor.update_parameters(**params)
    return executor


def resource_groups(runs: list[Run]) -> list[tuple[dict, list[Run]]]:
    """Runs with identical resources, in order of first appearance: one job array each on SLURM."""
    groups: dict[str, tuple[dict, list[Run]]] = {}
    for run in runs:
        key = json.dumps(run.resources, sort_keys=True, default=str)
        groups.setdefault(key, (run.resources, []))[1].append(run)
    return list(groups.values())


def describe(resources: dict) -> str:
    """e.g. ``1 node x 2 tasks, 1 cpu/task, 4 GB, 60 min``."""
    res = resources
    parts = [f"{res['nodes']} node{'s' if res['nodes'] > 1 else ''} x {tasks_of(res)} task{'s' if tasks_of(res) > 1 else ''}"]
    if res["gpus_per_node"]:
        parts.append(f"{res['gpus_per_node']} GPU/node")
    parts += [f"{res['cpus_per_task']} cpu/task", f"{res['mem_gb']} GB", f"{res['time_min']} min"]
    parts += [f"{k} {res[k]}" for k in ("partition", "account", "qos", "constraint") if res.get(k)]
    return ", ".join(parts)


def squeue_states(job_ids: list[str]) -> dict[str, str]:
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


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Launch:
    """Submits ``runs`` of ``sweep`` on ``cluster`` and (optionally) waits; :meth:`go` returns outcomes."""

    def __init__(self, sweep: Sweep, runs: list[Run], cluster: str, parallel: int, progress_s: float = 60.0):
        self.sweep, self.runs, self.cluster = sweep, runs, cluster
        self.parallel, self.progress_s = parallel, progress_s
        self.handles: dict[str, Any] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.started = time.time()
        self.interrupted = False

    # -- submission -----------------------------------------------------------------------------
    def _record(self, runs: list[Run], handles: list) -> None:
        record_jobs(self.sweep, {run.run_id: {"cluster": self.cluster, "job_id": h.job_id, "submitted": time.time()}
                                 for run, h in zip(runs, handles)})  # fmt: skip
        for run, handle in zip(runs, handles):
            self.handles[run.run_id] = handle

    def _prepare(self, run: Run) -> TrainJob:
        tb_dir(self.sweep, run).mkdir(parents=True, exist_ok=True)
        return TrainJob(job_spec(self.sweep, run))

    def _submit_arrays(self) -> None:
        groups = resource_groups(self.runs)
        for resources, runs in groups:
            executor = make_executor(self.sweep, "slurm", resources)
            try:
                handles = executor.map_array(_call, [self._prepare(run) for run in runs])
            except Exception as err:  # noqa: BLE001  (sbatch missing, a bad partition, ...)
                raise SubmissionError(f"could not submit {len(runs)} run(s) ({describe(resources)}) to SLURM: "
                                      f"{_last_line(str(err)) or type(err).__name__}") from None  # fmt: skip
            self._record(runs, handles)
            array = str(handles[0].job_id).split("_")[0]
            log(f"submitted job array {array}: {len(runs)} run(s) ({describe(resources)}): "
                + ", ".join(f"{run.run_id}={h.job_id}" for run, h in zip(runs, handles)))  # fmt: skip

    # -- outcomes -------------------------------------------------------------------------------
    def _classify(self, run: Run, handle: Any, error: BaseException | None) -> Outcome:
        rdir = run_dir(self.sweep, run)
        train_log = rdir / "train.log"
        job_log = Path(handle.paths.stderr) if hasattr(handle, "paths") else None
        log_path = train_log if train_log.is_file() else job_log
        result = read_result(self.sweep, run) or {}
        fresh = error is None or str(result.get("job_id")) == str(handle.job_id)  # else an earlier job's result
        state = result.get("state") if fresh else None
        if error is None and state == FINISHED:
            return Outcome(run, FINISHED, f"{result.get('updates')} updates", train_log)
        if state == FAILED:  # fairseq failed and the job said so: its log's last line is the error
            return Outcome(run, FAILED, f"fairseq-train exit {result.get('exit_code')}: {_last_line(result.get('error'))}",
                           log_path)  # fmt: skip
        if state in (FINISHED, CANCELLED):
            return Outcome(run, state, "cancelled" if state == CANCELLED else "", log_path)
        entry = read_jobs(self.sweep).get(run.run_id, {})
        scheduler = str(getattr(handle, "state", "") or "")
        if entry.get("cancelled_at"):
            mark_cancelled(self.sweep, run, handle.job_id)
            return Outcome(run, CANCELLED, "cancelled (fairseq-sweep cancel or Ctrl-C); `run` resumes it", log_path)
        first = _last_line(str(error)) if error is not None else "no result"
        why = f"the job ended without a result (scheduler state {scheduler or 'unknown'}): {first}"
        update_result(rdir / "result.json", when=settles(handle.job_id), state=FAILED, error=why, exit_code=None,
                      job_id=handle.job_id, job_log=str(job_log) if job_log else None)  # fmt: skip
        remove_stale_temporaries(rdir)
        return Outcome(run, FAILED, why, job_log if job_log and job_log.is_file() else log_path)

    def _collect(self, run: Run, handle: Any) -> Outcome:
        try:
            handle.results()
            error = None
        except Exception as err:  # noqa: BLE001  (one failed arm must not stop the others)
            error = err
        return self._finish(run, self._classify(run, handle, error))

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
        live = {}  # the controller's view; submitit's handle state (sacct) lags behind it
        if self.cluster == "slurm":
            live = squeue_states([str(h.job_id) for h in self.handles.values()])
        for run_id, handle in self.handles.items():
            state = "RUNNING"
            if self.cluster == "slurm":
                state = (live.get(str(handle.job_id)) or str(getattr(handle, "state", "") or "UNKNOWN")).split()[0]
            if state in ("PENDING", "REQUEUED", "CONFIGURING", "UNKNOWN", "READY"):
                pending += 1
                continue
            updates = parse_log(run_dir(self.sweep, next(r for r in self.runs if r.run_id == run_id)) / "train.log")
            running.append(f"{run_id} @ {updates.get('updates', 0)} updates")
        if running:
            parts.append(f"{len(running)} running ({', '.join(running)})")
        if pending:
            parts.append(f"{pending} pending in SLURM")
        if queued:
            parts.append(f"{queued} waiting for a free slot (parallel={self.parallel})")
        log(f"{_fmt_s(time.time() - self.started)}: " + ", ".join(parts))

    def _loop(self, queue: list[Run], executors: dict[str, Any]) -> None:
        last = time.time()
        poll = POLL_S.get(self.cluster, 1.0)
        while queue or self.handles:
            while queue and len(self.handles) < self.parallel:
                run = queue.pop(0)
                handle = executors[run.run_id].submit(_call, self._prepare(run))
                self._record([run], [handle])
                log(f"started {run.run_id} as job {handle.job_id} (local, {describe(run.resources)})")
            for run in [r for r in self.runs if r.run_id in self.handles]:
                if self.handles[run.run_id].done():
                    self._collect(run, self.handles[run.run_id])
            if time.time() - last >= self.progress_s and (queue or self.handles):
                self._progress(len(queue))
                last = time.time()
            time.sleep(poll)

    def _debug(self) -> None:
        for resources, runs in resource_groups(self.runs):
            executor = make_executor(self.sweep, "debug", resources)
            if tasks_of(resources) > 1:
                log(f"debug: each job runs as ONE task in this process ({tasks_of(resources)} tasks/node ignored)")
            for run in runs:
                handle = executor.submit(_call, self._prepare(run))
                self._record([run], [handle])
                log(f"running {run.run_id} in this process (debug job {handle.job_id}); log: "
                    f"{run_dir(self.sweep, run) / 'train.log'}")  # fmt: skip
                saved = os.environ.get("SUBMITIT_DEBUG_JOB_ID")
                os.environ["SUBMITIT_DEBUG_JOB_ID"] = str(handle.job_id)  # what DebugJob.results() sets
                try:
                    handle.submission().result()  # not handle.results(): that one calls pdb.post_mortem
                    error = None
                except Exception as err:  # noqa: BLE001
                    error = err
                finally:
                    if saved is None:
                        os.environ.pop("SUBMITIT_DEBUG_JOB_ID", None)
                    else:
                        os.environ["SUBMITIT_DEBUG_JOB_ID"] = saved
                self._finish(run, self._classify(run, handle, error))

    # -- interruption ---------------------------------------------------------------------------
    def _interrupted(self) -> None:
        if self.cluster == "slurm":
            log(f"stopped waiting; {len(self.handles)} job(s) keep running in SLURM "
                f"(fairseq-sweep status / fairseq-sweep cancel {self.sweep.source})")  # fmt: skip
            for run in self.runs:
                if run.run_id in self.handles:
                    self.outcomes[run.run_id] = Outcome(run, "submitted", "still in SLURM")
            return
        live = [r for r in self.runs if r.run_id in self.handles]
        record_jobs(self.sweep, {r.run_id: {"cancelled_at": time.time()} for r in live}, merge=True)
        for run in live:
            handle = self.handles[run.run_id]
            if hasattr(handle, "cancel"):
                handle.cancel(check=False)  # local: SIGINT to the job's controller
        deadline = time.time() + 60
        for run in live:
            handle = self.handles[run.run_id]
            while self.cluster == "local" and not handle.done() and time.time() < deadline:
                time.sleep(0.2)
            self._finish(run, self._classify(run, handle, RuntimeError("interrupted")))

    def go(self, wait: bool) -> list[Outcome]:
        """Submit (and wait when asked; local and debug always wait); outcomes in run order.

        Ctrl-C or SIGTERM (see :func:`interrupt_on_sigterm`) ends it early and sets ``interrupted``:
        local and debug jobs are then cancelled (resumable), SLURM jobs are left running."""
        queue: list[Run] = []
        try:
            if self.cluster == "debug":
                self._debug()
            elif self.cluster == "slurm":
                self._submit_arrays()
                if wait:
                    self._loop([], {})
            else:
                executors = {}
                for resources, runs in resource_groups(self.runs):
                    executor = make_executor(self.sweep, "local", resources)
                    executors.update({run.run_id: executor for run in runs})
                queue = list(self.runs)
                self._loop(queue, executors)
        except (Interrupted, KeyboardInterrupt):
            self.interrupted = True
            log("interrupted")
            self._interrupted()
            for run in queue:
                self.outcomes[run.run_id] = Outcome(run, "not launched", "the launch was interrupted before it")
        for run in self.runs:
            if run.run_id not in self.outcomes and run.run_id in self.handles:
                self.outcomes[run.run_id] = Outcome(run, "submitted", f"job {self.handles[run.run_id].job_id}")
        return [self.outcomes[r.run_id] for r in self.runs if r.run_id in self.outcomes]


def mark_cancelled(sweep: Sweep, run: Run, job_id: Any) -> dict:
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
    metric = {"metric": sweep.metric["name"], "split": sweep.metric["split"],
              "lower_is_better": sweep.metric["lower_is_better"]}  # fmt: skip
    fields.update({k: v for k, v in parse_log(rdir / "train.log", **metric).items() if v is not None})
    data = update_result(rdir / "result.json", when=settles(job_id), **fields)
    remove_stale_temporaries(rdir)
    return data


def _call(job: Callable[[], Any]):  # map_array needs a function of one argument; this is importable
    return job()
