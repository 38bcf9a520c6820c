"""Tables and plots of the approximation experiment: results.csv, sweep.csv, results.md, *.png."""

from __future__ import annotations

import csv
import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import leaves the root logger verbose

FIELDS = ["part", "corpus", "inputs", "bucket", "attention", "clusters", "topk", "seed", "n", "n_train",
          "mean_tokens", "min_tokens", "max_tokens", "accuracy", "agreement", "cosine_mean", "cosine_min"]  # fmt: skip
NAMES = {"softmax": "full", "clustered": "clustered", "i_clustered": "i-clustered"}


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _stats(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean, std = _stats(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _arm(row: dict) -> Tuple[str, str, str]:
    return row["attention"], str(row["clusters"]), str(row["topk"])


def _regime(row: dict, clusters: int, topk: int) -> str:
    """Whether the approximation can act at these lengths (C clusters, top-k keys)."""
    lo, hi = row["min_tokens"], row["max_tokens"]
    if hi <= clusters:
        return "L ≤ C: exact-ish both"
    if hi <= topk:
        return "i-cl. exact (L ≤ k)" if lo > clusters else "mixed; i-cl. exact"
    if lo > topk:
        return "L > k: both approximate"
    return "mixed"


def _groups(rows: Sequence[dict]) -> Dict[tuple, Dict[tuple, List[dict]]]:
    groups: Dict[tuple, Dict[tuple, List[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[(row["corpus"], row["inputs"], row["bucket"])][_arm(row)].append(row)
    return groups


def main_table(rows: Sequence[dict], clusters: int, topk: int) -> str:
    full, cl, icl = ("softmax", "", ""), ("clustered", str(clusters), ""), ("i_clustered", str(clusters), str(topk))
    header = ["corpus", "inputs", "length bucket", "tokens (mean, min–max)", "n test", "regime",
              "acc full", "acc clustered", "acc i-clustered", "cos clustered", "cos i-clustered",
              "agree clustered", "agree i-clustered"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (corpus, inputs, bucket), arms in _groups(rows).items():
        ref = arms[full][0]
        get = lambda arm, key: [r[key] for r in arms.get(arm, [])]  # noqa: E731
        cells = [corpus, inputs, bucket, f"{ref['mean_tokens']:.0f} ({ref['min_tokens']}–{ref['max_tokens']})",
                 str(ref["n"]), _regime(ref, clusters, topk), _fmt(get(full, "accuracy")),
                 _fmt(get(cl, "accuracy")), _fmt(get(icl, "accuracy")), _fmt(get(cl, "cosine_mean"), 4),
                 _fmt(get(icl, "cosine_mean"), 4), _fmt(get(cl, "agreement")), _fmt(get(icl, "agreement"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(rows: Sequence[dict]) -> str:
    header = ["attention", "clusters", "topk", "accuracy", "agreement with full", "cosine to full", "min cosine"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, members in _groups(rows)[(rows[0]["corpus"], rows[0]["inputs"], "all")].items():
        get = lambda key: [r[key] for r in members]  # noqa: E731
        cells = [NAMES[arm[0]], arm[1] or "–", arm[2] or "–", _fmt(get("accuracy")), _fmt(get("agreement")),
                 _fmt(get("cosine_mean"), 4), f"{min(get('cosine_min')):.4f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _series(rows: Sequence[dict], key, where) -> Tuple[List[float], List[float], List[float]]:
    """x, mean, std of ``key`` over seeds for the rows passing ``where``, x from ``key[0]``."""
    xs: Dict[float, List[float]] = defaultdict(list)
    for row in rows:
        if where(row):
            xs[float(key[0](row))].append(key[1](row))
    order = sorted(xs)
    return order, [_stats(xs[x])[0] for x in order], [_stats(xs[x])[1] for x in order]


def _log2_axis(ax, ticks: Sequence[float]) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_by_length(path: Path, rows: Sequence[dict], clusters: int, topk: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    corpora = sorted({r["corpus"] for r in rows})
    colors = dict(zip(corpora, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    full_acc = {(r["corpus"], r["inputs"], r["bucket"]): r["accuracy"] for r in rows if r["attention"] == "softmax"}
    for corpus in corpora:
        for attention, style in (("clustered", "-o"), ("i_clustered", "--s")):
            where = lambda r: (r["corpus"] == corpus and r["attention"] == attention  # noqa: E731
                               and not (r["inputs"] == "sentences" and r["bucket"] == "all"))
            x, y, e = _series(rows, (lambda r: r["mean_tokens"], lambda r: max(1 - r["cosine_mean"], 1e-7)), where)
            label = f"{corpus}, {NAMES[attention]}"
            left.errorbar(x, y, yerr=e, fmt=style, color=colors[corpus], label=label, ms=4, capsize=2)
            drop = lambda r: full_acc[(r["corpus"], r["inputs"], r["bucket"])] - r["accuracy"]  # noqa: E731
            x, y, e = _series(rows, (lambda r: r["mean_tokens"], drop), where)
            right.errorbar(x, y, yerr=e, fmt=style, color=colors[corpus], label=label, ms=4, capsize=2)
    lengths = sorted({r["mean_tokens"] for r in rows})
    for ax in (left, right):
        _log2_axis(ax, [t for t in (8, 16, 32, 64, 128, 256, 512) if lengths and lengths[0] / 2 <= t <= lengths[-1] * 2])
        ax.axvline(clusters, color="grey", lw=0.8, ls=":", label=f"C = {clusters}")
        ax.axvline(topk, color="grey", lw=0.8, ls="-.", label=f"topk = {topk}")
        ax.set_xlabel("input length in tokens (mean of the bucket / documents)")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("1 − cosine to the full embedding (1e-7 = exact)")
    right.set_ylabel("accuracy of full − accuracy of approx")
    right.axhline(0, color="black", lw=0.8)
    left.legend(fontsize=7)
    fig.suptitle(f"all-MiniLM-L6-v2, attention replaced without retraining ({clusters} clusters, topk {topk})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: Path, rows: Sequence[dict], clusters: int, topk: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["bucket"] == "all"]
    full = next(r for r in rows if r["attention"] == "softmax")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    acc = lambda r: r["accuracy"]  # noqa: E731
    gap = lambda r: max(1 - r["cosine_mean"], 1e-7)  # noqa: E731
    for col, (metric, name) in enumerate(((acc, "accuracy"), (gap, "1 − cosine to full"))):
        ax = axes[0, col]
        for attention, style in (("clustered", "-o"), ("i_clustered", "--s")):
            where = lambda r: r["attention"] == attention and (attention == "clustered" or r["topk"] == topk)  # noqa: E731
            x, y, e = _series(rows, (lambda r: r["clusters"], metric), where)
            suffix = f" (topk {topk})" if attention == "i_clustered" else ""
            ax.errorbar(x, y, yerr=e, fmt=style, label=NAMES[attention] + suffix, capsize=2)
        ax.set_xlabel("clusters C")
        ax = axes[1, col]
        where = lambda r: r["attention"] == "i_clustered" and r["clusters"] == clusters  # noqa: E731
        x, y, e = _series(rows, (lambda r: r["topk"], metric), where)
        ax.errorbar(x, y, yerr=e, fmt="--s", color="tab:orange", label=f"i-clustered (C = {clusters})", capsize=2)
        ax.set_xlabel("topk k")
        for ax in axes[:, col]:
            _log2_axis(ax, sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()}))
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if metric is acc:
                ax.axhline(full["accuracy"], color="black", ls=":", label="full attention")
            else:
                ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.suptitle(f"{full['corpus']}, {full['inputs']} ({full['mean_tokens']:.0f} tokens on average, "
                 f"{full['n']} test inputs): sweep of clusters and topk")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, rows: Sequence[dict], args, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    main = [r for r in rows if r["part"] == "main"]
    sweep = [r for r in rows if r["part"] == "sweep"]
    _write_csv(out / "results.csv", main)
    _write_csv(out / "sweep.csv", sweep)
    plot_by_length(out / "by_length.png", main, args.clusters, args.topk)
    if sweep:
        plot_sweep(out / "sweep.png", sweep, args.clusters, args.topk)
    seeds = ", ".join(map(str, args.seeds))
    parts = [
        f"# all-MiniLM-L6-v2 with clustered attention, no retraining\n",
        f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \n"
        f"Wall time: {meta['wall_time_s']:.0f} s  \nCommit: {meta['commit']}\n",
        f"## Accuracy and embedding similarity ({args.clusters} clusters, topk {args.topk}; "
        f"mean ± std over clustering seeds {seeds})\n",
        main_table(main, args.clusters, args.topk),
        "\nacc: logistic regression fitted on the full model's embeddings of the train inputs, applied to the "
        "test inputs embedded with each attention. agree: fraction of test inputs whose prediction equals the "
        "full model's. cos: mean cosine similarity to the full model's embedding. regime: with L ≤ C tokens "
        "clustered attention is capped at L clusters (one query per cluster possible, so close to exact); with "
        "L ≤ topk improved-clustered attention is exactly softmax attention; only longer inputs test the "
        "approximation. Documents pack same-label test sentences up to the given number of tokens.\n",
    ]
    if sweep:
        first = sweep[0]
        parts += [
            f"## Sweep: {first['corpus']}, {first['inputs']} (seeds {', '.join(map(str, args.sweep_seeds))})\n",
            sweep_table(sweep),
            "",
        ]
    (out / "results.md").write_text("\n".join(parts) + "\n")
