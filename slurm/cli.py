"""``fairseq-sweep run|status|report|cancel SWEEP.yaml [options] [dotlist overrides]``."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import report as report_mod
from .job import REPO, TrainJob, fairseq_train_path
from .runs import FAILED, FINISHED, LockedError, read_jobs, read_result, record_jobs, run_dir, sweep_lock, tb_dir, write_json
from .spec import Run, SpecError, Sweep, fairseq_argv, load

ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "RESIZING",
         "SUSPENDED", "SIGNALING", "STAGE_OUT"}  # fmt: skip


def log(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


def job_spec(sweep: Sweep, run: Run) -> dict[str, Any]:
    rdir, tdir = run_dir(sweep, run), tb_dir(sweep, run)
    res = sweep.resources
    return {
        "run_id": run.run_id, "arm": run.arm, "seed": run.seed, "attention": run.attention, "args": run.args,
        "run_dir": str(rdir), "fairseq_train": fairseq_train_path(),
        "argv": fairseq_argv(sweep, run, rdir, tdir, REPO / "fairseq_plugin"),
        "gpus": res["gpus_per_node"] * res["nodes"], "threads": res["cpus_per_task"],
        "metric": {"metric": sweep.metric["name"], "split": sweep.metric["split"],
                   "lower_is_better": sweep.metric["lower_is_better"]},
    }  # fmt: skip


def make_executor(sweep: Sweep, cluster: str):
    import submitit

    res = sweep.resources
    folder = sweep.dir / "submitit" / "%j"
    tasks = res["gpus_per_node"] or res["tasks_per_node"]  # one task per GPU
    if cluster == "local":  # LocalExecutor directly: AutoExecutor does not pass signal_delay_s
        executor = submitit.LocalExecutor(folder=folder)
        params: dict[str, Any] = {"timeout_min": res["time_min"], "tasks_per_node": tasks,
                                  "signal_delay_s": res["signal_delay_s"]}  # fmt: skip
        if res["gpus_per_node"]:
            params["gpus_per_node"] = res["gpus_per_node"]
        executor.update_parameters(**params)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = {"timeout_min": res["time_min"], "nodes": res["nodes"], "tasks_per_node": tasks,
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


def submit(executor, jobs: list[TrainJob], cluster: str, parallel: int, on_submit) -> list:
    """SLURM: one job array. local/debug: at most ``parallel`` jobs at a time (2 cores are not 8)."""
    if cluster == "slurm":
        submitted = executor.map_array(_call, jobs)
        on_submit(list(range(len(jobs))), submitted)
        return submitted
    submitted: list = [None] * len(jobs)
    queue = list(range(len(jobs)))
    while queue or any(j is not None and not j.done() for j in submitted):
        running = sum(1 for j in submitted if j is not None and not j.done())
        while queue and running < parallel:
            index = queue.pop(0)
            submitted[index] = executor.submit(_call, jobs[index])
            on_submit([index], [submitted[index]])
            running += 1
        time.sleep(0.5)
    return submitted


def prepare_data(sweep: Sweep) -> None:
    if sweep.data_path is None or (sweep.data_path / "dict.txt").is_file():
        return
    command = sweep.data_prepare.replace("{python}", shlex.quote(sys.executable))
    log(f"preparing data: {command}")
    proc = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not (sweep.data_path / "dict.txt").is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise SpecError(f"key 'data.prepare': {command!r} exited {proc.returncode} without writing "
                        f"{sweep.data_path / 'dict.txt'}: {' | '.join(tail)}")  # fmt: skip


def job_state(sweep: Sweep, entry: dict) -> str | None:
    """SLURM's view of a recorded job (via submitit/sacct), or None when unknown / not SLURM."""
    if not entry or entry.get("cluster") != "slurm":
        return None
    from submitit.slurm.slurm import SlurmJob

    try:
        return SlurmJob(folder=sweep.dir / "submitit" / "%j", job_id=str(entry["job_id"])).state
    except Exception:  # noqa: BLE001  (sacct unavailable: unknown)
        return None


def cmd_run(sweep: Sweep, args: argparse.Namespace) -> int:
    runs = sweep.runs()
    with sweep_lock(sweep):
        prepare_data(sweep)
        write_json(sweep.dir / "sweep.json", {"source": str(sweep.source), "config": sweep.config})
        jobs = read_jobs(sweep)
        todo, skipped, alive = [], [], []
        for run in runs:
            result = read_result(sweep, run) or {}
            if result.get("state") == FINISHED:
                skipped.append(run)
                continue
            state = job_state(sweep, jobs.get(run.run_id, {}))
            if state is not None and state.split()[0] in ALIVE:
                alive.append(run)
                continue
            todo.append(run)
        log(f"{sweep.name}: {len(runs)} runs, {len(skipped)} finished (skipped), {len(alive)} queued or running "
            f"(left alone), {len(todo)} to {'launch' if not args.dry_run else 'launch (dry run)'}")  # fmt: skip
        if args.dry_run:
            for run in todo:
                print(run.run_id, " ".join(shlex.quote(a) for a in [fairseq_train_path(), *job_spec(sweep, run)["argv"]]))
            return 0
        submitted = []
        if todo:
            executor = make_executor(sweep, args.cluster)
            for run in todo:  # a resumed run keeps its checkpoints; a failed one starts over its attempt
                tb_dir(sweep, run).mkdir(parents=True, exist_ok=True)
            jobs_ = [TrainJob(job_spec(sweep, run)) for run in todo]

            def on_submit(indices, handles):
                record_jobs(sweep, {todo[i].run_id: {"cluster": args.cluster, "job_id": h.job_id, "submitted": time.time()}
                                    for i, h in zip(indices, handles)})  # fmt: skip
                for i, h in zip(indices, handles):
                    log(f"submitted {todo[i].run_id} as job {h.job_id} ({args.cluster})")

            parallel = sweep.resources["parallel"] or max(1, (os.cpu_count() or 1) // sweep.resources["cpus_per_task"])
            submitted = submit(executor, jobs_, args.cluster, parallel, on_submit)
        wait = args.wait or args.cluster != "slurm"
        if wait and submitted:
            failures = 0
            for run, job in zip(todo, submitted):
                try:
                    job.results()
                    log(f"finished {run.run_id}")
                except Exception as err:  # noqa: BLE001  (one failed arm must not stop the others)
                    failures += 1
                    first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                    log(f"FAILED {run.run_id}: {first[:300]}")
    if wait or not todo:
        print()
        report_mod.report(sweep, quiet=False)
    return 0


def _call(job: TrainJob):  # map_array needs a function of one argument; this is importable
    return job()


def cmd_status(sweep: Sweep, args: argparse.Namespace) -> int:
    jobs = read_jobs(sweep)
    rows = []
    for run in sweep.runs():
        result = read_result(sweep, run) or {}
        entry = jobs.get(run.run_id, {})
        state = result.get("state", "not started")
        live = job_state(sweep, entry)
        if live and state not in (FINISHED, FAILED):
            state = f"{state} (slurm: {live.split()[0]})"
        best = result.get("best_metric")
        rows.append([run.run_id, state, str(result.get("updates", "")), "" if best is None else f"{best:.4f}",
                     str(entry.get("job_id", ""))])  # fmt: skip
    print(report_mod.text_table(["run", "state", "updates", f"best {sweep.metric['split']}_{sweep.metric['name']}", "job"], rows))
    return 0


def cmd_cancel(sweep: Sweep, args: argparse.Namespace) -> int:
    import signal

    jobs = read_jobs(sweep)
    cancelled = 0
    for run in sweep.runs():
        entry = jobs.get(run.run_id)
        result = read_result(sweep, run) or {}
        if not entry or result.get("state") in (FINISHED, FAILED):
            continue
        job_id = str(entry["job_id"])
        if entry["cluster"] == "slurm":
            subprocess.run(["scancel", job_id], check=False)
        elif entry["cluster"] == "local":
            try:
                os.kill(int(job_id), signal.SIGINT)
            except (ProcessLookupError, ValueError):
                continue
        cancelled += 1
        log(f"cancelled {run.run_id} (job {job_id})")
    log(f"{cancelled} job(s) cancelled")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fairseq-sweep", description="Run, watch and report fairseq sweeps.")
    parser.add_argument("command", choices=("run", "status", "report", "cancel"))
    parser.add_argument("sweep", type=Path, help="sweep file (YAML), e.g. experiments/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. model.clusters=200")
    parser.add_argument("--cluster", choices=("local", "slurm", "debug"), default="local")
    parser.add_argument("--partition", help="SLURM partition (overrides resources.partition)")
    parser.add_argument("--gpus-per-node", type=int, help="overrides resources.gpus_per_node (one task per GPU)")
    parser.add_argument("--nodes", type=int, help="overrides resources.nodes")
    parser.add_argument("--wait", action="store_true", help="with --cluster slurm: wait for the jobs and report")
    parser.add_argument("--dry-run", action="store_true", help="print what would be launched, launch nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for noisy in ("matplotlib", "tensorboard", "PIL", "fairseq.tasks.text_to_speech"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(args.overrides)
    for flag, key in (("partition", "resources.partition"), ("gpus_per_node", "resources.gpus_per_node"),
                      ("nodes", "resources.nodes")):  # fmt: skip
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        sweep = load(args.sweep, overrides, check_arch=args.command == "run", check_data=args.command == "run")
        handler = {"run": cmd_run, "status": cmd_status, "cancel": cmd_cancel,
                   "report": lambda s, a: bool(report_mod.report(s, quiet=False)) and 0}[args.command]  # fmt: skip
        return int(handler(sweep, args) or 0)
    except (SpecError, LockedError) as err:
        print(f"fairseq-sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
