"""Aggregation: result.json + TensorBoard event files -> results.csv, results.md, plots/*.png.

Curves are read with TensorBoard's own ``EventAccumulator`` (fairseq writes one event tree per
split under ``<sweep>/tb/<run-id>/<split>``). A partial sweep is reported as far as it ran, and
the report says which runs are missing and why.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from .runs import FINISHED, read_result
from .spec import Sweep

Point = tuple[int, float, float]  # (step, wall time, value) of a TensorBoard scalar
CSV_FIELDS = ["run_id", "arm", "attention", "seed", "state", "final_metric", "best_metric", "updates", "wall_time_s",
              "gpu_hours", "tokens_per_s", "attempts", "job_id", "error"]  # fmt: skip


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def curves(sweep: Sweep, run_id: str, tag: str) -> list[Point]:
    """(step, wall_time, value) of one scalar from a run's TensorBoard events (all splits tried)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    split, _, name = tag.partition("/")
    path = sweep.dir / "tb" / run_id / split
    if not path.is_dir():
        return []
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    if name not in acc.Tags().get("scalars", []):
        return []
    points = {e.step: (e.step, e.wall_time, e.value) for e in acc.Scalars(name)}  # a resumed run rewrites steps
    return [points[s] for s in sorted(points)]


def _fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def collect(sweep: Sweep) -> list[dict[str, Any]]:
    rows = []
    for run in sweep.runs():
        result = read_result(sweep, run) or {}
        row = {"run_id": run.run_id, "arm": run.arm, "attention": run.attention, "seed": run.seed,
               "state": result.get("state", "not started")}  # fmt: skip
        for key in CSV_FIELDS[5:]:
            row[key] = result.get(key)
        if row["error"]:
            row["error"] = str(row["error"]).strip().splitlines()[-1][:200]
        rows.append(row)
    return rows


def report(sweep: Sweep, quiet: bool = True) -> dict[str, Path]:
    out = sweep.dir
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep)
    metric = sweep.metric.key
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_arm[row["arm"]].append(row)
    direction = "lower" if sweep.metric.lower_is_better else "higher"
    header = ["arm", "attention", "seeds done", f"final {metric}", f"best {metric}", "updates", "wall time (s)",
              "GPU-hours", "tokens/s"]  # fmt: skip
    table = []
    for arm, members in by_arm.items():
        done = [r for r in members if r["state"] == FINISHED]
        table.append([arm, members[0]["attention"], f"{len(done)}/{len(members)}",
                      _fmt([r["final_metric"] for r in done]), _fmt([r["best_metric"] for r in done]),
                      _fmt([r["updates"] for r in done], 0), _fmt([r["wall_time_s"] for r in done], 0),
                      _fmt([r["gpu_hours"] for r in done], 4), _fmt([r["tokens_per_s"] for r in done], 0)])  # fmt: skip
    missing = [r for r in rows if r["state"] != FINISHED]
    md = [f"# Sweep `{sweep.name}`", "", f"Metric: `{metric}` ({direction} is better); mean ± std over finished seeds.", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cells) + " |" for cells in table]
    if missing:
        md += ["", f"**Partial sweep**: {len(missing)} of {len(rows)} runs not finished:", ""]
        md += [f"- `{r['run_id']}`: {r['state']}" + (f" ({r['error']})" if r.get("error") else "") for r in missing]
    (out / "results.md").write_text("\n".join(md) + "\n")
    plots = _plots(sweep, rows, metric)
    if not quiet:
        print(text_table(header, table))
        if missing:
            print(f"\nmissing: {len(missing)} of {len(rows)} runs not finished: "
                  + ", ".join(f"{r['run_id']} ({r['state']})" for r in missing))  # fmt: skip
        print(f"\nwrote {out / 'results.csv'}, {out / 'results.md'}" + "".join(f", {p}" for p in plots.values()))
        print(f"tensorboard --logdir {out / 'tb'}")
    return {"csv": out / "results.csv", "md": out / "results.md", **plots}


def _plots(sweep: Sweep, rows: list[dict[str, Any]], metric: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = sweep.dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    kinds = sorted({r["attention"] for r in rows})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    tag = f"{sweep.metric.split}/{sweep.metric.name}"

    def elapsed(row: dict[str, Any], points: list[Point]) -> tuple[list[float], list[float]]:
        # The paper's speed-accuracy view: the metric against elapsed wall-clock per run
        # (TensorBoard event times, from the run's first logged training step).
        starts = curves(sweep, row["run_id"], "train_inner/loss")
        t0 = min([p[1] for p in starts] + [points[0][1]])
        return [p[1] - t0 for p in points], [p[2] for p in points]

    def by_update(row: dict[str, Any], points: list[Point]) -> tuple[list[float], list[float]]:
        return [p[0] for p in points], [p[2] for p in points]

    def plot(xy: Callable[[dict[str, Any], list[Point]], tuple[list[float], list[float]]], xlabel: str, title: str,
             name: str, mark_last: bool) -> Path:
        fig, ax = plt.subplots(figsize=(6, 4))
        labelled: set[str] = set()
        for row in rows:
            points = curves(sweep, row["run_id"], tag)
            if not points:
                continue
            xs, ys = xy(row, points)
            label = row["attention"] if row["attention"] not in labelled else None
            labelled.add(row["attention"])
            color = colors[row["attention"]]
            if mark_last:  # the final value marked
                ax.plot(xs, ys, color=color, label=label, alpha=0.8)
                ax.scatter(xs[-1:], ys[-1:], color=color)
            else:
                ax.plot(xs, ys, marker=".", color=color, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(title)
        if labelled:
            ax.legend()
        fig.tight_layout()
        path = plot_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    plots = {
        "speed_accuracy": plot(elapsed, "elapsed wall-clock (s, from the first logged step)",
                               f"{sweep.name}: {metric} vs training time", "metric_vs_time.png", True),
        "learning_curves": plot(by_update, "updates", f"{sweep.name}: learning curves (TensorBoard)",
                                "learning_curves.png", False),
    }  # fmt: skip
    for key, values in sweep.grid.items():  # e.g. accuracy against sequence length
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            plots[f"metric_vs_{key}"] = _plot_against(sweep, rows, metric, key, plot_dir / f"metric_vs_{key}.png", plt)
    return plots


def _plot_against(sweep: Sweep, rows: list[dict[str, Any]], metric: str, key: str, path: Path, plt: Any) -> Path:
    """The best metric of the finished runs against a numeric grid key: one line per configuration
    (the arm without that key), mean over seeds, seeds as dots."""
    runs = {run.run_id: run for run in sweep.runs()}
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        run = runs.get(row["run_id"])
        if run is None or row["state"] != FINISHED or row["best_metric"] is None:
            continue
        label = run.arm.replace(f"{key}{run.args[key]}", "").replace("__", "_").strip("_") or run.attention  # run ids: spec.expand
        series[label][float(run.args[key])].append(float(row["best_metric"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        xs = sorted(points)
        line = ax.plot(xs, [statistics.mean(points[x]) for x in xs], marker="o", label=label)[0]
        for x in xs:
            ax.scatter([x] * len(points[x]), points[x], color=line.get_color(), s=8, alpha=0.5)
    if len({v for p in series.values() for v in p}) > 2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{sweep.name}: best {metric} vs {key}")
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
