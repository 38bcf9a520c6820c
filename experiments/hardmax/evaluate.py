"""Test accuracy of the hardmax sentiment sweep (docs/results.md section 3).

Runs after ``fairseq-sweep run experiments/hardmax/sentiment.yaml`` (same file, same overrides). For
every finished run it loads ``checkpoint_best.pt`` (chosen on valid accuracy) and classifies the
valid and test splits with ``model.eval()``: the exact hardmax for the hardmax model, softmax for the
softmax one. For the hardmax model it also classifies test with the training-time attention (the
low-temperature softmax, T = 0.001), to show how far the training stand-in is from the exact hardmax.

    python -m experiments.hardmax.evaluate experiments/hardmax/sentiment.yaml [OVERRIDES ...]

Writes ``<sweep dir>/hardmax_results.{csv,md,json}`` (per run, and mean ± std per attention and d next
to the paper's IMDb numbers) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch

from ..machine import machine

HEAD = "sentence_classification_head"
PAPER_IMDB = {2: 79.0, 4: 82.0, 8: 85.0, 16: 88.0}  # hardmax test accuracy, d = 2/4/8/16 (DESIGN.md §2)
COLUMNS = ["run_id", "attention", "variant", "d", "seed", "updates", "best_epoch_valid_acc", "valid_acc", "test_acc",
           "test_acc_train_attention", "alpha", "wall_time_s", "git_commit"]  # fmt: skip


class Split(NamedTuple):
    """One split in file order: token ids (padded with ``pad``) and labels."""

    tokens: List[torch.Tensor]  # per sentence, 1-D (with the trailing </s>)
    labels: torch.Tensor  # (n,)


def load_model(checkpoint: Path, data: Path):
    """(model in eval mode, task) from a run's checkpoint, reading data from ``data``."""
    import fairseq_plugin
    from fairseq import checkpoint_utils

    fairseq_plugin.register()

    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint (did the sweep run finish?)")
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides={"data": str(data)})
    model = models[0]
    model.eval()
    return model, task


def read_split(task, split: str) -> Split:
    """The split's sentences in file order (sentence_prediction's own dataset: input0 + label)."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    items = [dataset[i] for i in range(len(dataset))]
    items.sort(key=lambda item: int(item["id"]))
    return Split([item["net_input.src_tokens"] for item in items], torch.stack([item["target"] for item in items]).view(-1))


def logits_of(model, tokens: List[torch.Tensor], pad: int, batch: int = 256, exact: Optional[bool] = None) -> torch.Tensor:
    """(n, classes) logits; ``exact=False`` on a hardmax model uses the training temperature."""
    out = []
    was_training = model.training
    if exact is not None:
        model.train(not exact)
    try:
        with torch.no_grad():
            for start in range(0, len(tokens), batch):
                chunk = tokens[start:start + batch]
                src = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=pad)  # (B, L)
                logits, _ = model(src, classification_head_name=HEAD)
                out.append(logits.float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def variant(model) -> str:
    """The attention type, and whether alpha was trained or fixed."""
    kind = model.attention_cfg.attention_type
    if model.layer.log_alpha.requires_grad:
        return f"{kind}, alpha trained"
    return f"{kind}, alpha fixed at {float(model.layer.alpha.detach()):g}"


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == labels).double().mean())


def _mean_std(values: List[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(rows: List[dict]) -> str:
    lines = ["| model | d | seeds | valid acc (%) | test acc (%) | test acc, training attention (%) | paper, IMDb hardmax (%) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["d"]), []).append(row)
    for (name, d), group in sorted(groups.items(), key=lambda kv: (not kv[0][0].startswith("hardmax"), kv[0])):
        paper = f"{PAPER_IMDB[d]:.0f}" if name.startswith("hardmax") and d in PAPER_IMDB else "–"
        lines.append(f"| {name} | {d} | {len(group)} | {_mean_std([r['valid_acc'] for r in group])} | "
                     f"{_mean_std([r['test_acc'] for r in group])} | "
                     f"{_mean_std([r['test_acc_train_attention'] for r in group])} | {paper} |")  # fmt: skip
    lines += ["", "| run | valid acc (best epoch, fairseq) | valid acc (recomputed) | test acc | alpha | updates | wall (s) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['run_id']} | {r['best_epoch_valid_acc']} | {r['valid_acc']:.2f} | {r['test_acc']:.2f} | "
                     f"{r['alpha']:.3f} | {r['updates']} | {r['wall_time_s']} |")  # fmt: skip
    return "\n".join(lines)


def evaluate_run(checkpoint: Path, data: Path) -> dict:
    model, task = load_model(checkpoint, data)
    pad = task.source_dictionary.pad()
    valid, test = read_split(task, "valid"), read_split(task, "test")
    row = {"valid_acc": accuracy(logits_of(model, valid.tokens, pad), valid.labels),
           "test_acc": accuracy(logits_of(model, test.tokens, pad), test.labels),
           "alpha": float(model.layer.alpha.detach()), "d": model.embed_tokens.embedding_dim,
           "attention": model.attention_cfg.attention_type, "variant": variant(model)}  # fmt: skip
    row["test_acc_train_attention"] = (accuracy(logits_of(model, test.tokens, pad, exact=False), test.labels)
                                       if row["attention"] == "hardmax" else float("nan"))  # fmt: skip
    return row


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep file (experiments/hardmax/sentiment.yaml)")
    parser.add_argument("overrides", nargs="*", help="the same OmegaConf dotlist overrides as the run")
    args = parser.parse_args(argv)
    from slurm import spec as sweep_spec
    from slurm.runs import FINISHED, read_result, run_dir

    started = time.time()
    try:
        sweep = sweep_spec.load(args.sweep, args.overrides)
    except sweep_spec.SpecError as err:
        raise SystemExit(f"evaluate.py: error: {err}") from None
    rows, missing = [], []
    for run in sweep.runs():
        result = read_result(sweep, run) or {}
        checkpoint = run_dir(sweep, run) / "checkpoints" / "checkpoint_best.pt"
        if result.get("state") != FINISHED or not checkpoint.is_file():
            missing.append(f"{run.run_id} ({result.get('state', 'not started')})")
            continue
        print(f"[evaluate] {run.run_id}: valid and test with {checkpoint.name}", file=sys.stderr, flush=True)
        row = {"run_id": run.run_id, "seed": run.seed, "updates": result.get("updates"),
               "best_epoch_valid_acc": result.get("best_metric"), "wall_time_s": result.get("wall_time_s"),
               "git_commit": result.get("git_commit")}  # fmt: skip
        row.update(evaluate_run(checkpoint, sweep.data_path))
        rows.append(row)
    if not rows:
        raise SystemExit(f"evaluate.py: error: no finished run with a checkpoint_best.pt under {sweep.dir}; "
                         f"run 'fairseq-sweep run {args.sweep}' first")  # fmt: skip
    out = sweep.dir
    with (out / "hardmax_results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    note = f"\n\nNot evaluated: {', '.join(missing)}" if missing else ""
    table = markdown(rows)
    (out / "hardmax_results.md").write_text(f"# Sweep `{sweep.name}`: valid and test accuracy\n\n{table}{note}\n")
    (out / "hardmax_results.json").write_text(json.dumps(
        {"rows": rows, "missing": missing, "machine": machine(), "sweep": str(args.sweep), "overrides": args.overrides,
         "evaluate_seconds": round(time.time() - started, 1)}, indent=1, default=str) + "\n")  # fmt: skip
    print(table + note)
    print(f"\nwrote {out / 'hardmax_results.md'}, {out / 'hardmax_results.csv'}, {out / 'hardmax_results.json'}")
    return rows


if __name__ == "__main__":
    main()
