"""The submitted job: one fairseq-train per task, distributed settings from submitit.

:class:`TrainJob` is a ``submitit.helpers.Checkpointable``: on preemption or timeout submitit
calls :meth:`TrainJob.checkpoint` (rank 0), which stops fairseq and requeues the same job; the
next attempt runs the same command, and fairseq resumes from ``checkpoint_last.pt`` in the run's
deterministic save dir (``--max-update`` and ``--stop-time-hours`` count across restarts, so the
run ends where an uninterrupted one would). Rank 0 owns ``result.json``.

fairseq writes ``checkpoint_<epoch>_<updates>.pt`` atomically but *copies* it to
``checkpoint_last.pt``; a job killed during that copy (scancel, an OOM kill) leaves a truncated
file that the next attempt could not load. Before each attempt rank 0 checks it and, if it is
broken, restores it from the newest intact checkpoint (:func:`repair_last_checkpoint`).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from . import rendezvous
from .runs import FAILED, FINISHED, REQUEUED, RUNNING, read_json, update_result
from .spec import JobSpec, Placement, fairseq_command

REPO = Path(__file__).resolve().parents[1]
SIGNAL_GRACE_S = 30
_CHILD: dict[str, Any] = {}  # the running fairseq-train (a Popen is not picklable, the job is)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "ve-fairseq", "submitit", "omegaconf", "fairseq-clustered-attention"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def parse_log(path: Path, metric: str = "loss", split: str = "valid", lower_is_better: bool = True) -> dict[str, Any]:
    """Metrics from fairseq's ``--log-format json`` lines: final/best metric, updates, tokens/s."""
    final = best = None
    updates = 0
    wps = []
    key = f"{split}_{metric}"
    if not path.is_file():
        return {}
    for line in path.read_text(errors="replace").splitlines():
        for tag in ("train_inner", "train", "valid", "test"):
            marker = f"| {tag} | "
            if marker not in line:
                continue
            try:
                stats = json.loads(line.split(marker, 1)[1])
            except json.JSONDecodeError:
                break
            for k in ("num_updates", "train_num_updates", "valid_num_updates"):
                if k in stats:
                    updates = int(float(stats[k]))
            if tag == "train_inner" and "wps" in stats:
                wps.append(float(stats["wps"]))
            if key in stats:
                final = float(stats[key])
                better = min if lower_is_better else max
                best = final if best is None else better(best, final)
            break
    return {"final_metric": final, "best_metric": best, "updates": updates,
            "tokens_per_s": round(sum(wps) / len(wps), 1) if wps else None}  # fmt: skip


class TrainJob(Checkpointable):
    """Runs one sweep run. ``spec`` is plain data (:func:`slurm.spec.job_spec`)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled (submitit, every requeue); a job pickled before JobSpec carried a dict."""
        self.__dict__.update(state)
        if isinstance(self.spec, dict):
            self.spec = JobSpec.from_legacy(self.spec)

    # -- the job --------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        spec = self.spec
        env = submitit.JobEnvironment()
        rank, world, local_rank = env.global_rank, env.num_tasks, env.local_rank
        run_dir = spec.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        result_path = run_dir / "result.json"
        place = Placement()
        if world > 1:
            # One task per GPU (or per CPU rank with gloo); fairseq is told, not left to guess.
            master = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]  # rank 0's host
            master, port = rendezvous.endpoint(run_dir, env.job_id, rank, master)  # a port no other job holds
            place = Placement(world=world, rank=rank, local_rank=local_rank, init_method=f"tcp://{master}:{port}")
        command = fairseq_command(spec, place)
        log_path = run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log")
        start = time.time()
        previous = read_json(result_path) or {}
        attempt = int(previous.get("attempts", 0)) + 1
        if rank == 0:
            note = repair_last_checkpoint(run_dir / "checkpoints")
            update_result(
                result_path, state=RUNNING, run_id=spec.run_id, arm=spec.arm, seed=spec.seed,
                attention=spec.attention, args=spec.args, attempts=attempt, job_id=env.job_id,
                restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)), world_size=world,
                gpus=spec.gpus, resources=spec.resources.of_job(), command=command, git_commit=_git_commit(),
                versions=_versions(), hostname=platform.node(), nodes=list(env.hostnames), attempt_started_at=start,
                error=None, exit_code=None, cancelled_at=None,
            )  # fmt: skip
        else:
            note = None
        child_env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "PYTHONUNBUFFERED": "1"}
        with log_path.open("a") as sink:
            sink.write(f"\n===== attempt {attempt} | job {env.job_id} | rank {rank}/{world} | {time.ctime()} =====\n")
            sink.write(" ".join(command) + "\n")
            if note:
                sink.write(note + "\n")
            sink.flush()
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env, cwd=run_dir,
                                    start_new_session=True)  # fmt: skip
            _CHILD.update(proc=proc, start=start, rank=rank, result=result_path)
            try:
                # poll, not wait(): a blocking wait() holds Popen's waitpid lock, and the USR2
                # handler (checkpoint) that interrupts it could then never reap the child.
                while (code := proc.poll()) is None:
                    time.sleep(0.5)
                if code < 0:
                    # Killed by a signal: on preemption SLURM (and job._interrupt) sends SIGTERM to
                    # every process before USR2 reaches us; give submitit's handler time to
                    # checkpoint and requeue instead of recording a failure.
                    sink.write(f"fairseq-train killed by signal {-code}; waiting {SIGNAL_GRACE_S}s for a requeue\n")
                    sink.flush()
                    time.sleep(SIGNAL_GRACE_S)
            finally:
                _stop(proc)
        elapsed = time.time() - start
        if rank != 0:
            if code != 0:
                raise RuntimeError(f"fairseq-train rank {rank} failed (exit {code}); see {log_path}")
            return {"rank": rank, "exit": code}
        wall = float(previous.get("wall_time_s", 0.0)) + elapsed
        devices = spec.gpus
        metrics = parse_log(log_path, spec.metric.name, spec.metric.split, spec.metric.lower_is_better)
        if code != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            update_result(result_path, state=FAILED, exit_code=code, error="\n".join(tail), wall_time_s=round(wall, 2),
                          gpu_hours=round(wall * devices / 3600, 6), **metrics)  # fmt: skip
            raise RuntimeError(f"fairseq-train failed (exit {code}) for run {spec.run_id}; see {log_path}")
        return update_result(
            result_path, state=FINISHED, exit_code=0, wall_time_s=round(wall, 2),
            gpu_hours=round(wall * devices / 3600, 6), cpu_task_hours=round(wall * world / 3600, 6),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metrics,
        )  # fmt: skip

    # -- preemption / timeout -------------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 before requeue: stop fairseq, record the attempt, requeue."""
        proc = _CHILD.get("proc")
        if proc is not None:
            _stop(proc)
        result = _CHILD.get("result")
        if result is not None:
            previous = read_json(result) or {}
            wall = float(previous.get("wall_time_s", 0.0)) + time.time() - _CHILD["start"]
            update_result(result, state=REQUEUED, wall_time_s=round(wall, 2),
                          requeues=int(previous.get("requeues", 0)) + 1)  # fmt: skip
            _CHILD.pop("result")
        return DelayedSubmission(TrainJob(self.spec), *args, **kwargs)


def _stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _intact(path: Path) -> bool:
    """torch.save writes a zip archive; a truncated copy has no central directory."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def repair_last_checkpoint(folder: Path) -> str | None:
    """Restore a truncated ``checkpoint_last.pt`` from the newest intact checkpoint; say what was done."""
    last = folder / "checkpoint_last.pt"
    if not last.is_file() or _intact(last):
        return None
    broken = last.with_name("checkpoint_last.pt.broken")
    os.replace(last, broken)
    # The newest interval/epoch checkpoint (what checkpoint_last.pt was a copy of); a best one only
    # if there is nothing else, as it may be older.
    candidates = sorted((p for p in folder.glob("checkpoint*.pt") if p.name != "checkpoint_last.pt" and _intact(p)),
                        key=lambda p: ("best" not in p.name, p.stat().st_mtime))  # fmt: skip
    if not candidates:
        return f"checkpoint_last.pt was truncated (kept as {broken.name}) and no intact checkpoint exists: starting over"
    tmp = folder / "checkpoint_last.pt.tmp"
    tmp.write_bytes(candidates[-1].read_bytes())
    os.replace(tmp, last)
    return f"checkpoint_last.pt was truncated (kept as {broken.name}); restored from {candidates[-1].name}"


def probe() -> dict[str, Any]:
    """What a task sees (rank, world size, visible GPUs); submit it to check a cluster's setup."""
    env = submitit.JobEnvironment()
    return {"job_id": env.job_id, "global_rank": env.global_rank, "local_rank": env.local_rank,
            "num_tasks": env.num_tasks, "num_nodes": env.num_nodes, "hostname": platform.node(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "slurm_gpus_on_node": os.environ.get("SLURM_GPUS_ON_NODE")}  # fmt: skip
