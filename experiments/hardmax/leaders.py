"""Which words lead? Hardmax leaders of the trained sentiment models (docs/results.md section 3).

Runs after the sweep (``experiments/hardmax/sentiment.yaml``, same overrides). For each hardmax arm
and d it takes the run with the best valid accuracy, classifies the test split with the exact hardmax, keeps
the *confident correct* sentences (right label, probability >= ``--confidence``), and counts the
tokens that are leaders at the last layer (in their own attention set at the input of layer L).
A word counts once per sentence. The leader rate is the fraction of those sentences containing the
word in which it leads.

Writes under ``<sweep dir>/leaders/``, per hardmax arm and d (``<tag>`` = ``<arm>_d<d>``):
``leader_words_<tag>.csv`` and ``leader_words_<tag>.png`` (the most frequent leader words of positive
and of negative sentences), and for d = 2 ``tokens_<tag>.png`` (tokens of test sentences at layer 0
and at the last layer, coloured by label, with the classifier's decision line) and
``tokens_<tag>_examples.png`` (four sentences, word by word).

    python -m experiments.hardmax.leaders experiments/hardmax/sentiment.yaml [OVERRIDES ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .evaluate import HEAD, Split, load_model, read_split

LABELS = {0: "negative", 1: "positive"}


def _pyplot():
    import logging

    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def analyse(model, task, split: Split, confidence: float, batch: int = 256) -> dict:
    """Exact-hardmax predictions and last-layer leaders of every sentence of ``split``."""
    if model.attention_cfg.attention_type != "hardmax":
        raise ValueError("leaders are defined for the hardmax model only")
    pad = task.source_dictionary.pad()
    probs, states0, states_last, leaders, tokens = [], [], [], [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(split.tokens), batch):
            src = torch.nn.utils.rnn.pad_sequence(split.tokens[start:start + batch], batch_first=True, padding_value=pad)
            traj = model.trajectory(src, exact=True, leaders=True)
            logits, _ = model(src, classification_head_name=HEAD)
            probs.append(logits.float().softmax(-1))
            for i in range(src.shape[0]):
                keep = ~traj.ignored[i]
                tokens.append(src[i][keep])
                states0.append(traj.states[0][i][keep])
                states_last.append(traj.states[-1][i][keep])
                leaders.append(traj.leaders[-1][i][keep])
    probs = torch.cat(probs)
    pred = probs.argmax(-1)
    confident = (pred == split.labels) & (probs.amax(-1) >= confidence)
    return {"probs": probs, "pred": pred, "confident": confident, "tokens": tokens, "states0": states0,
            "states_last": states_last, "leaders": leaders}  # fmt: skip


def leader_counts(result: dict, dictionary) -> Dict[int, Dict[str, Counter]]:
    """Per label: Counters ``leader`` (sentences where the word leads) and ``present`` (sentences with the word)."""
    counts = {label: {"leader": Counter(), "present": Counter()} for label in LABELS}
    for i in result["confident"].nonzero().flatten().tolist():
        label = int(result["pred"][i])
        words = [dictionary[t] for t in result["tokens"][i].tolist()]
        counts[label]["present"].update(set(words))
        counts[label]["leader"].update({w for w, lead in zip(words, result["leaders"][i].tolist()) if lead})
    return counts


def write_counts(counts: Dict[int, Dict[str, Counter]], path: Path) -> List[dict]:
    """Every word that leads at least once, per label, most frequent leader first."""
    rows = []
    for label, name in LABELS.items():
        for word, n in counts[label]["leader"].most_common():
            present = counts[label]["present"][word]
            rows.append({"label": name, "word": word, "leader_in_sentences": n, "present_in_sentences": present,
                         "leader_rate": round(n / present, 3)})  # fmt: skip
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "word", "leader_in_sentences", "present_in_sentences", "leader_rate"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def by_rate(counts: Dict[str, Counter], min_present: int) -> List[tuple]:
    """(word, leader count) ordered by leader rate (then count), words present in >= min_present sentences."""
    rate = {w: n / counts["present"][w] for w, n in counts["leader"].items() if counts["present"][w] >= min_present}
    return sorted(((w, counts["leader"][w]) for w in rate), key=lambda wn: (-rate[wn[0]], -wn[1], wn[0]))


def plot_counts(counts: Dict[int, Dict[str, Counter]], title: str, path: Path, top: int = 20, min_present: int = 8) -> None:
    """Top row: the most frequent leader words; bottom row: the words that lead most reliably."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 2 * (0.3 * top + 1.0)))
    for col, ((label, name), color) in enumerate(zip(LABELS.items(), ("tab:red", "tab:blue"))):
        rankings = ((counts[label]["leader"].most_common(top), "most frequent leaders"),
                    (by_rate(counts[label], min_present)[:top], f"highest leader rate (in >= {min_present} sentences)"))  # fmt: skip
        for row, (ranked, what) in enumerate(rankings):
            ax = axes[row, col]
            ranked = ranked[::-1]
            ax.barh(range(len(ranked)), [n for _, n in ranked], color=color)
            ax.set_yticks(range(len(ranked)), [f"{w} ({n / max(counts[label]['present'][w], 1):.0%})" for w, n in ranked],
                          fontsize=8)  # fmt: skip
            ax.set_xlabel("confident correct test sentences where the word leads", fontsize=8)
            ax.set_title(f"{name} sentences: {what}; leader rate in brackets", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tokens(model, result: dict, labels: torch.Tensor, dictionary, path: Path, sentences: int = 300) -> None:
    """All tokens of up to ``sentences`` confident correct test sentences, layer 0 and last layer (d = 2)."""
    plt = _pyplot()
    chosen = result["confident"].nonzero().flatten()[:sentences].tolist()
    head = model.classification_heads[HEAD]
    w = (head.weight[1] - head.weight[0]).detach().double()
    b = float((head.bias[1] - head.bias[0]).detach())
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, key, layer in ((axes[0], "states0", 0), (axes[1], "states_last", model.num_layers)):
        for label, color in ((0, "tab:red"), (1, "tab:blue")):
            pts = [result[key][i] for i in chosen if int(labels[i]) == label]
            if not pts:
                continue
            pts = torch.cat(pts).double()
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.35, color=color, label=f"tokens of {LABELS[label]} sentences")
        lead = torch.cat([result[key][i][result["leaders"][i]] for i in chosen]).double()
        ax.scatter(lead[:, 0], lead[:, 1], s=40, marker="*", facecolors="none", edgecolors="k", lw=0.6,
                   label="last-layer leaders")  # fmt: skip
        if layer:
            words = Counter(dictionary[t] for i in chosen for t in result["tokens"][i][result["leaders"][i]].tolist())
            placed = set()
            for i in chosen:
                for t, p in zip(result["tokens"][i][result["leaders"][i]].tolist(), result[key][i][result["leaders"][i]]):
                    word = dictionary[t]
                    if word not in placed and words[word] >= 3 and len(placed) < 25:
                        placed.add(word)
                        ax.annotate(word, p.tolist(), fontsize=7, xytext=(3, 3), textcoords="offset points")
            lo, hi = ax.get_xlim()
            if abs(float(w[1])) > 1e-12:  # decision line of the linear classifier on the mean token
                xs = torch.linspace(lo, hi, 50, dtype=torch.float64)
                ax.plot(xs, -(w[0] * xs + b) / w[1], "k--", lw=1, label="classifier boundary (on the mean)")
                ax.set_xlim(lo, hi)
        ax.set_title(f"layer {layer}" + (" (embedding)" if layer == 0 else " (last)"), fontsize=10)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"d = 2 hardmax model: tokens of {len(chosen)} confident correct test sentences", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(model, result: dict, dictionary, path: Path, count: int = 4, max_words: int = 14) -> None:
    """A few short confident correct sentences, each token's path from layer 0 to the last layer."""
    plt = _pyplot()
    picks = []
    for label in (1, 0):
        for i in result["confident"].nonzero().flatten().tolist():
            if int(result["pred"][i]) == label and 5 <= len(result["tokens"][i]) <= max_words:
                picks.append(i)
                if len([p for p in picks if int(result["pred"][p]) == label]) == count // 2:
                    break
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 4.4), squeeze=False)
    for ax, i in zip(axes[0], picks):
        z0, zl, lead = result["states0"][i].double(), result["states_last"][i].double(), result["leaders"][i]
        words = [dictionary[t] for t in result["tokens"][i].tolist()]
        for j, word in enumerate(words):
            ax.annotate("", zl[j].tolist(), z0[j].tolist(), arrowprops=dict(arrowstyle="->", color="0.6", lw=0.7))
            ax.annotate(word, z0[j].tolist(), fontsize=7, color="k" if not lead[j] else "tab:green")
        ax.scatter(z0[:, 0], z0[:, 1], s=10, color="0.3")
        ax.scatter(zl[lead, 0], zl[lead, 1], s=90, marker="*", color="gold", edgecolors="k", zorder=3)
        ax.set_title(f"{LABELS[int(result['pred'][i])]} (p = {float(result['probs'][i].max()):.2f})\n"
                     f"{' '.join(words)[:70]}", fontsize=7)  # fmt: skip
    fig.suptitle("token paths from layer 0 to the last layer (green words / gold stars: last-layer leaders)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_runs(sweep) -> Dict[tuple, tuple]:
    """(arm label, d) -> (run, checkpoint, valid accuracy) of the best finished hardmax run."""
    from slurm.runs import FINISHED, read_result, run_dir

    best: Dict[tuple, tuple] = {}
    for run in sweep.runs():
        if run.attention != "hardmax":
            continue
        result = read_result(sweep, run) or {}
        checkpoint = run_dir(sweep, run) / "checkpoints" / "checkpoint_best.pt"
        if result.get("state") != FINISHED or not checkpoint.is_file() or result.get("best_metric") is None:
            continue
        d = int(run.args.get("encoder_embed_dim", 16))
        key = (run.arm.rsplit("_encoder_embed_dim", 1)[0], d)
        if key not in best or result["best_metric"] > best[key][2]:
            best[key] = (run, checkpoint, result["best_metric"])
    return best


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep file (experiments/hardmax/sentiment.yaml)")
    parser.add_argument("overrides", nargs="*", help="the same OmegaConf dotlist overrides as the run")
    parser.add_argument("--confidence", type=float, default=0.9, help="minimum predicted probability of a kept sentence")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    from slurm import spec as sweep_spec

    try:
        sweep = sweep_spec.load(args.sweep, args.overrides)
    except sweep_spec.SpecError as err:
        raise SystemExit(f"leaders.py: error: {err}") from None
    best = best_runs(sweep)
    if not best:
        raise SystemExit(f"leaders.py: error: no finished hardmax run under {sweep.dir}; run 'fairseq-sweep run {args.sweep}' first")
    out = sweep.dir / "leaders"
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for (arm, d), (run, checkpoint, valid) in sorted(best.items()):
        tag = f"{arm}_d{d}"
        print(f"[leaders] {tag}: {run.run_id} (valid accuracy {valid}), {args.split} split", file=sys.stderr, flush=True)
        model, task = load_model(checkpoint, sweep.data_path)
        split = read_split(task, args.split)
        result = analyse(model, task, split, args.confidence)
        counts = leader_counts(result, task.source_dictionary)
        rows = write_counts(counts, out / f"leader_words_{tag}.csv")
        kept = int(result["confident"].sum())
        title = (f"d = {d} hardmax ({run.run_id}): last-layer leaders in {kept} confident (p >= {args.confidence}) "
                 f"correct {args.split} sentences")  # fmt: skip
        plot_counts(counts, title, out / f"leader_words_{tag}.png")
        tokens = sum(len(t) for i, t in enumerate(result["tokens"]) if result["confident"][i])
        lead = sum(int(result["leaders"][i].sum()) for i in result["confident"].nonzero().flatten().tolist())
        summary[tag] = {"run": run.run_id, "valid_accuracy": valid, "confident_correct": kept, "sentences": len(split.labels),
                        "leaders_per_sentence": round(lead / max(kept, 1), 2), "leader_fraction": round(lead / max(tokens, 1), 3),
                        "alpha": round(float(model.layer.alpha.detach()), 4),
                        "top_positive": [r["word"] for r in rows if r["label"] == "positive"][:15],
                        "top_negative": [r["word"] for r in rows if r["label"] == "negative"][:15],
                        "reliable_positive": [w for w, _ in by_rate(counts[1], 8)[:15]],
                        "reliable_negative": [w for w, _ in by_rate(counts[0], 8)[:15]]}  # fmt: skip
        print(f"[leaders] {tag}: {kept}/{len(split.labels)} confident correct; leaders per sentence "
              f"{summary[tag]['leaders_per_sentence']}; positive: {' '.join(summary[tag]['top_positive'][:10])}; "
              f"negative: {' '.join(summary[tag]['top_negative'][:10])}; most reliable leaders: positive "
              f"{' '.join(summary[tag]['reliable_positive'][:10])}; negative {' '.join(summary[tag]['reliable_negative'][:10])}",
              file=sys.stderr, flush=True)  # fmt: skip
        if d == 2:
            plot_tokens(model, result, split.labels, task.source_dictionary, out / f"tokens_{tag}.png")
            plot_examples(model, result, task.source_dictionary, out / f"tokens_{tag}_examples.png")
    (out / "summary.json").write_text(json.dumps({"confidence": args.confidence, "split": args.split, "by_run": summary},
                                                 indent=1) + "\n")  # fmt: skip
    print(f"[leaders] wrote {out}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
