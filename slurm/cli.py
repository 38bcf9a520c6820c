"""``fairseq-sweep run|status|report|cancel SWEEP.yaml [options] [dotlist overrides]``.

Exit status: 0 when everything the command waited for finished; 1 when a waited-for run failed or
was cancelled (one line each, with the log to read) or a cancel could not be confirmed; 2 for a
bad sweep file, bad arguments or a sweep another launch holds; 130 when a launch was interrupted
(Ctrl-C, or ``fairseq-sweep cancel``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

from . import report as report_mod
from .cancel import cancel, is_alive, local_controller_alive, slurm_states
from .job import fairseq_train_path
from .launch import (Interrupted, Launch, SubmissionError, _call, describe, interrupt_on_sigterm, job_spec, log,
                     resource_groups)  # fmt: skip
from .runs import FAILED, FINISHED, LockedError, read_jobs, read_result, sweep_lock, write_json
from .spec import REPO, SpecError, Sweep, data_ready, expand, load, placeholders, sweep_dir

__all__ = ["main", "_call"]  # _call: jobs pickled by earlier versions name slurm.cli._call


def prepare_data(sweep: Sweep) -> None:
    """Run ``data.prepare`` when ``data.path`` holds no dictionary, showing its output as it goes."""
    if sweep.data_path is None or data_ready(sweep.data_path):
        return
    command = placeholders(sweep.data_prepare, quote=True)
    log(f"preparing data (data.prepare, in {sweep_dir(sweep.source)}): {command}")
    # the repository on PYTHONPATH, so that "{python} -m experiments.<module>" works from anywhere
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, shell=True, cwd=sweep_dir(sweep.source), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    tail: list[str] = []
    for line in proc.stdout:
        print(f"  | {line.rstrip()}", flush=True)
        tail = (tail + [line.strip()])[-5:]
    code = proc.wait()
    if code != 0 or not data_ready(sweep.data_path):
        raise SpecError(f"key 'data.prepare': {command!r} exited {code} without writing "
                        f"{sweep.data_path / 'dict.txt'}: {' | '.join(tail)}")  # fmt: skip


def live_states(sweep: Sweep) -> dict[str, str]:
    """run id -> the scheduler's view of its latest job: SLURM jobs (one squeue, one sacct call), local ones."""
    jobs = read_jobs(sweep)
    slurm = {run_id: str(e["job_id"]) for run_id, e in jobs.items() if e.get("cluster") == "slurm"}
    try:
        states = slurm_states(sweep, list(slurm.values()))
    except Exception:  # noqa: BLE001  (no SLURM client here: unknown)
        states = {}
    out = {run_id: states[job_id] for run_id, job_id in slurm.items() if states.get(job_id)}
    for run_id, entry in jobs.items():
        if entry.get("cluster") == "local":
            out[run_id] = "RUNNING" if local_controller_alive(sweep, str(entry["job_id"])) else "GONE"
    return out


def cmd_run(sweep: Sweep, args: argparse.Namespace) -> int:
    runs = sweep.runs()
    with sweep_lock(sweep, args.cluster):
        live = live_states(sweep)
        todo, skipped, alive = [], [], []
        for run in runs:
            if (read_result(sweep, run) or {}).get("state") == FINISHED:
                skipped.append(run)
            elif is_alive(live.get(run.run_id)):  # a queued/running SLURM job, or a local one left by a dead launch
                alive.append(run)
            else:
                todo.append(run)
        configs = len({r.arm for r in expand(sweep)})
        sampled = len({r.arm for r in runs})
        if sampled < configs:
            log(f"trials: {sampled} of {configs} configurations drawn with seed {sweep.trials['seed']} "
                f"(trials.num={sweep.trials['num']}): {', '.join(dict.fromkeys(r.arm for r in runs))}")  # fmt: skip
        verb = "launch (dry run: nothing is launched)" if args.dry_run else "launch"
        log(f"{sweep.name}: {len(runs)} runs, {len(skipped)} finished (skipped), {len(alive)} queued or running "
            f"(left alone), {len(todo)} to {verb}")  # fmt: skip
        if args.dry_run:
            if sweep.data_path is not None and not data_ready(sweep.data_path):
                log(f"data.prepare would run first: {sweep.data_prepare}")
            for resources, group in resource_groups(todo):
                how = "one job array" if args.cluster == "slurm" else "jobs"
                print(f"# {len(group)} run(s) as {how}: {describe(resources)}")
                for run in group:
                    print(run.run_id, shlex.join([fairseq_train_path(), *job_spec(sweep, run)["argv"]]))
            return 0
        prepare_data(sweep)
        write_json(sweep.dir / "sweep.json", {"source": str(sweep.source), "config": sweep.config})
        outcomes, interrupted = [], False
        wait = args.wait or args.cluster != "slurm"
        if todo:
            cpus = max(r.resources["cpus_per_task"] for r in todo)
            parallel = sweep.resources["parallel"] or max(1, (os.cpu_count() or 1) // cpus)
            launch = Launch(sweep, todo, args.cluster, parallel, progress_s=args.progress_every)
            with interrupt_on_sigterm():  # fairseq-sweep cancel stops a local/debug launch with SIGTERM
                outcomes = launch.go(wait)
            interrupted = launch.interrupted
    if (wait and not interrupted) or not todo:
        print()
        report_mod.report(sweep, quiet=False)
    failed = [o for o in outcomes if o.state not in (FINISHED, "submitted")]
    if failed:
        print(f"\n{len(failed)} of {len(outcomes)} launched run(s) did not finish:")
        for outcome in failed:
            print(f"  {outcome.line()}")
    if interrupted:
        print(f"interrupted; `fairseq-sweep run {sweep.source}` resumes the cancelled runs from their checkpoints")
        return 130
    if todo and not wait:
        log(f"submitted, not waiting (--wait waits and reports): `fairseq-sweep status {sweep.source}` follows "
            f"the jobs, `fairseq-sweep cancel {sweep.source}` stops them")
    return 1 if failed else 0


def cmd_status(sweep: Sweep, args: argparse.Namespace) -> int:
    jobs = read_jobs(sweep)
    live = live_states(sweep)
    rows, counts = [], Counter()
    for run in sweep.runs():
        result = read_result(sweep, run) or {}
        entry = jobs.get(run.run_id, {})
        state = result.get("state") or ("queued" if is_alive(live.get(run.run_id)) else "not started")
        counts[state] += 1
        now = live.get(run.run_id)
        if now and state not in (FINISHED, FAILED, "cancelled"):
            state = f"{state} ({entry.get('cluster')}: {now.split()[0]})"
        best, wall = result.get("best_metric"), result.get("wall_time_s")
        rows.append([run.run_id, state, str(result.get("updates", "")), "" if best is None else f"{best:.4f}",
                     "" if wall is None else f"{wall:.0f}", str(entry.get("job_id", ""))])  # fmt: skip
    header = ["run", "state", "updates", f"best {sweep.metric['split']}_{sweep.metric['name']}", "wall (s)", "job"]
    print(report_mod.text_table(header, rows))
    print(f"\n{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
    return 0


def cmd_cancel(sweep: Sweep, args: argparse.Namespace) -> int:
    return cancel(sweep, sweep.runs())


def cmd_report(sweep: Sweep, args: argparse.Namespace) -> int:
    report_mod.report(sweep, quiet=False)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fairseq-sweep", description="Run, watch, report and cancel fairseq sweeps.",
                                     epilog="exit status: 0 ok, 1 a run failed or was cancelled, 2 bad input, "
                                            "130 interrupted")  # fmt: skip
    parser.add_argument("command", choices=("run", "status", "report", "cancel"))
    parser.add_argument("sweep", type=Path, help="sweep file (YAML), e.g. experiments/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. model.clusters=200")
    parser.add_argument("--cluster", choices=("local", "slurm", "debug"), default="local",
                        help="local: subprocesses (default); slurm: job arrays; debug: in this process, one by one")
    parser.add_argument("--partition", help="SLURM partition (overrides resources.partition)")
    parser.add_argument("--gpus-per-node", type=int, help="overrides resources.gpus_per_node (one task per GPU)")
    parser.add_argument("--nodes", type=int, help="overrides resources.nodes")
    parser.add_argument("--num-trials", type=int, metavar="N",
                        help="random N configurations of the sweep, each with all its seeds; -1 = all (trials.num)")
    parser.add_argument("--trials-seed", type=int, metavar="S", help="seed of that draw (trials.seed, default 0)")
    parser.add_argument("--wait", action="store_true", help="with --cluster slurm: wait for the jobs and report")
    parser.add_argument("--dry-run", action="store_true", help="print what would be launched, launch nothing")
    parser.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                        help="while waiting, a progress line this often (default 60)")
    return parser.parse_intermixed_args(argv)  # overrides may follow options, as in the README


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for noisy in ("matplotlib", "tensorboard", "PIL", "fairseq.tasks.text_to_speech"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(args.overrides)
    for flag, key in (("partition", "resources.partition"), ("gpus_per_node", "resources.gpus_per_node"),
                      ("nodes", "resources.nodes"), ("num_trials", "trials.num"),
                      ("trials_seed", "trials.seed")):  # fmt: skip
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    handler = {"run": cmd_run, "status": cmd_status, "cancel": cmd_cancel, "report": cmd_report}[args.command]
    try:
        sweep = load(args.sweep, overrides, check_arch=args.command == "run", check_data=args.command == "run")
        return int(handler(sweep, args) or 0)
    except (SpecError, LockedError, SubmissionError) as err:
        print(f"fairseq-sweep: error: {err}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("fairseq-sweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
