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

from typing import Any, NoReturn

from . import report as report_mod
from .backends import BACKENDS, Backend, backend, describe, live_states
from .cancel import cancel
from .launch import NOT_WAITED, Interrupted, Launch, Outcome, SubmissionError, _call, interrupt_on_sigterm, resource_groups
from .runs import CANCELLED, FAILED, FINISHED, LockedError, log, read_jobs, read_result, sweep_lock, write_json
from .spec import REPO, Run, SpecError, Sweep, data_ready, expand, fairseq_command, job_spec, load, placeholders, sweep_dir

__all__ = ["main", "_call"]  # _call: jobs pickled by earlier versions name slurm.cli._call


def prepare_data(sweep: Sweep) -> None:
    """Run ``data.prepare`` when ``data.path`` holds no dictionary, showing its output as it goes."""
    if sweep.data_path is None or data_ready(sweep.data_path) or not sweep.data_prepare:
        return
    command = placeholders(sweep.data_prepare, quote=True)
    log(f"preparing data (data.prepare, in {sweep_dir(sweep.source)}): {command}")
    # the repository on PYTHONPATH, so that "{python} -m experiments.<module>" works from anywhere
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, shell=True, cwd=sweep_dir(sweep.source), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    tail: list[str] = []
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        print(f"  | {line.rstrip()}", flush=True)
        tail = (tail + [line.strip()])[-5:]
    code = proc.wait()
    if code != 0 or not data_ready(sweep.data_path):
        raise SpecError(f"key 'data.prepare': {command!r} exited {code} without writing "
                        f"{sweep.data_path / 'dict.txt'}: {' | '.join(tail)}")  # fmt: skip


def cmd_run(sweep: Sweep, args: argparse.Namespace) -> int:
    chosen = backend(args.cluster)  # the one place a --cluster name becomes behaviour
    runs = sweep.runs()
    with sweep_lock(sweep, chosen.name):
        live = live_states(sweep, read_jobs(sweep))
        todo: list[Run] = []
        skipped: list[Run] = []
        alive: list[Run] = []
        for run in runs:
            if (read_result(sweep, run) or {}).get("state") == FINISHED:
                skipped.append(run)
            elif _alive(live.get(run.run_id)):  # a queued/running SLURM job, or a local one left by a dead launch
                alive.append(run)
            else:
                todo.append(run)
        configs = len({r.arm for r in expand(sweep)})
        sampled = len({r.arm for r in runs})
        if sampled < configs:
            log(f"trials: {sampled} of {configs} configurations drawn with seed {sweep.trials.seed} "
                f"(trials.num={sweep.trials.num}): {', '.join(dict.fromkeys(r.arm for r in runs))}")  # fmt: skip
        verb = "launch (dry run: nothing is launched)" if args.dry_run else "launch"
        log(f"{sweep.name}: {len(runs)} runs, {len(skipped)} finished (skipped), {len(alive)} queued or running "
            f"(left alone), {len(todo)} to {verb}")  # fmt: skip
        if args.dry_run:
            if sweep.data_path is not None and not data_ready(sweep.data_path):
                log(f"data.prepare would run first: {sweep.data_prepare}")
            for resources, group in resource_groups(todo):
                print(f"# {len(group)} run(s) as {chosen.batch}: {describe(resources)}")
                for run in group:
                    print(run.run_id, shlex.join(fairseq_command(job_spec(sweep, run))))
            return 0
        prepare_data(sweep)
        write_json(sweep.dir / "sweep.json", {"source": str(sweep.source), "config": sweep.config})
        outcomes: list[Outcome] = []
        interrupted = False
        wait = args.wait or not chosen.detached
        if todo:
            cpus = max(r.resources.cpus_per_task for r in todo)
            parallel = sweep.resources.parallel or max(1, (os.cpu_count() or 1) // cpus)
            launch = Launch(sweep, todo, chosen, parallel, progress_s=args.progress_every)
            with interrupt_on_sigterm():  # fairseq-sweep cancel stops a local/debug launch with SIGTERM
                outcomes = launch.go(wait)
            interrupted = launch.interrupted
    if (wait and not interrupted) or not todo:
        print()
        report_mod.report(sweep, quiet=False)
    failed = [o for o in outcomes if o.state not in (FINISHED, NOT_WAITED)]
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


def _alive(live: tuple[Backend, str] | None) -> bool:
    return live is not None and live[0].alive(live[1])


def _nodes(result: dict[str, Any]) -> str:
    """The nodes a run used, as result.json records them (a list; absent for older runs)."""
    nodes = result.get("nodes")
    if isinstance(nodes, (list, tuple)):
        return ",".join(map(str, nodes))
    return "" if nodes is None else str(nodes)


def cmd_status(sweep: Sweep, args: argparse.Namespace) -> int:
    jobs = read_jobs(sweep)
    live = live_states(sweep, jobs)
    rows: list[list[str]] = []
    counts: Counter[str] = Counter()
    nodes: list[str] = []
    for run in sweep.runs():
        result = read_result(sweep, run) or {}
        entry = jobs.get(run.run_id, {})
        state = result.get("state") or ("queued" if _alive(live.get(run.run_id)) else "not started")
        counts[state] += 1
        now = live.get(run.run_id)
        if now and state not in (FINISHED, FAILED, CANCELLED):
            state = f"{state} ({now[0].name}: {now[1].split()[0]})"
        best, wall = result.get("best_metric"), result.get("wall_time_s")
        rows.append([run.run_id, state, str(result.get("updates", "")), "" if best is None else f"{best:.4f}",
                     "" if wall is None else f"{wall:.0f}", str(entry.get("job_id", ""))])  # fmt: skip
        nodes.append(_nodes(result))
    header = ["run", "state", "updates", f"best {sweep.metric.key}", "wall (s)", "job"]
    if any(nodes):  # runs recorded by launchers that know where a job ran
        header.append("nodes")
        rows = [row + [where] for row, where in zip(rows, nodes)]
    print(report_mod.text_table(header, rows))
    print(f"\n{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
    return 0


def cmd_cancel(sweep: Sweep, args: argparse.Namespace) -> int:
    return cancel(sweep, sweep.runs())


def cmd_report(sweep: Sweep, args: argparse.Namespace) -> int:
    report_mod.report(sweep, quiet=False)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (the error and where to read more), not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="fairseq-sweep", description="Run, watch, report and cancel fairseq sweeps.",
                     epilog="exit status: 0 ok, 1 a run failed or was cancelled, 2 bad input, 130 interrupted")  # fmt: skip
    parser.add_argument("command", choices=("run", "status", "report", "cancel"))
    parser.add_argument("sweep", type=Path, help="sweep file (YAML), e.g. experiments/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. model.clusters=200")
    parser.add_argument("--cluster", choices=tuple(BACKENDS), default="local",
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
    except OSError as err:  # a directory the sweep names that cannot be made, read or written
        where = f"{err.filename}: " if err.filename else ""
        print(f"fairseq-sweep: error: {where}{err.strerror or err} (check the sweep file's 'root' and 'data.path', "
              "and that you may write there)", file=sys.stderr)  # fmt: skip
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("fairseq-sweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
