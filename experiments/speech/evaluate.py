"""The speech sweep's table: test-set and real-clip error rates, updates and time per update of each run.

Runs after ``fairseq-sweep run experiments/speech/sweep.yaml`` (same file, same overrides). For every
finished run it reads the run's ``train.log`` (fairseq's json records: updates, training seconds,
validation CER/WER) and greedy-decodes, with decode_ctc.py and the run's ``checkpoint_best.pt``
(chosen on valid CER):

- the ``test`` split of the sweep's data (voices held out from train and valid);
- the ten real clips of pocketsphinx-testdata (prepare_pocketsphinx.py), as a smoke check that real
  audio flows through the same features and decoder: ``cards`` (card phrases the grammar covers)
  and ``librivox`` (read book sentences: words the synthetic corpus never has).

    python -m experiments.speech.evaluate experiments/speech/sweep.yaml [OVERRIDES ...]

Writes ``<sweep dir>/speech_results.csv``, ``speech_results.md`` and ``speech_results.json`` (the
table plus the machine, commit and wall times), the hypotheses under ``<run dir>/decode/<split>.txt``,
and prints the Markdown table. CER counts character edits (the space included), WER word edits, in
percent. s/update is fairseq's training time (``train_wall``, validation excluded) per update; the
valid CER at the last validation step all runs reached compares the arms at equal updates (the
budget compares them at equal time).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

from slurm import spec as sweep_spec
from slurm.runs import FINISHED, read_result, run_dir

from ..machine import machine
from .prepare_pocketsphinx import prepare as prepare_clips
from .s2t_data import DataError

REAL_SPLITS = ("cards", "librivox")
COLUMNS = ["run_id", "attention", "seed", "updates", "s_per_update", "train_minutes", "valid_cer_best", "valid_wer_best",
           "test_cer", "test_wer", "cards_cer", "cards_wer", "librivox_cer", "librivox_wer", "git_commit"]  # fmt: skip


def log_records(path: Path) -> dict[str, list[dict]]:
    """fairseq's ``--log-format json`` records of a train.log, by tag (train_inner, train, valid)."""
    records: dict[str, list[dict]] = {"train_inner": [], "train": [], "valid": []}
    for line in path.read_text(errors="replace").splitlines():
        for tag in records:
            marker = f"| {tag} | "
            if marker in line:
                try:
                    records[tag].append(json.loads(line.split(marker, 1)[1]))
                except json.JSONDecodeError:
                    pass
                break
    return records


def training_stats(path: Path) -> dict:
    records = log_records(path)
    inner = records["train_inner"]
    updates = max((int(float(r.get("num_updates", r.get("train_num_updates", 0)))) for r in inner + records["train"]),
                  default=0)  # fmt: skip
    logged = int(float(inner[-1]["num_updates"])) if inner else 0  # train_wall is summed per logged interval
    train_seconds = sum(float(r.get("train_wall", 0)) for r in inner)
    valid = [r for r in records["valid"] if "valid_uer" in r]
    best = min(valid, key=lambda r: float(r["valid_uer"]), default=None)
    return {
        "updates": updates,
        "s_per_update": train_seconds / logged if logged else math.nan,
        "valid_cer_best": float(best["valid_uer"]) if best else math.nan,
        "valid_wer_best": float(best["valid_wer"]) if best else math.nan,
        "valid_curve": [(int(float(r["valid_num_updates"])), float(r["valid_uer"]), float(r["valid_wer"])) for r in valid],
    }


def decode(checkpoint: Path, data: Path, split: str, out: Path) -> dict[str, float]:
    """decode_ctc.py in this process; its H-/T- lines and summary go to ``out``."""
    from .decode_ctc import main as decode_main

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as sink, contextlib.redirect_stdout(sink):
        return decode_main([str(checkpoint), "--data", str(data), "--split", split, "--cpu"])


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def common_step(rows: list[dict]) -> int | None:
    """The last validation step every run reached: where the runs compare at equal updates."""
    steps = [{step for step, _, _ in r["valid_curve"]} for r in rows]
    shared = set.intersection(*steps) if steps else set()
    return max(shared) if shared else None


def markdown(rows: list[dict]) -> str:
    step = common_step(rows)
    header = ["run", "attention", "updates", "s/update", f"valid CER @ {step} updates", "valid CER (best)", "test CER",
              "test WER", "real clips: cards CER / WER", "librivox CER / WER"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        at_step = next((cer for s, cer, _ in r["valid_curve"] if s == step), None)
        lines.append("| " + " | ".join([
            r["run_id"], r["attention"], str(r["updates"]), _fmt(r["s_per_update"]), _fmt(at_step),
            _fmt(r["valid_cer_best"]),
            _fmt(r["test_cer"]), _fmt(r["test_wer"]), f"{_fmt(r['cards_cer'], 1)} / {_fmt(r['cards_wer'], 1)}",
            f"{_fmt(r['librivox_cer'], 1)} / {_fmt(r['librivox_wer'], 1)}",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep file (experiments/speech/sweep.yaml)")
    parser.add_argument("overrides", nargs="*", help="the same OmegaConf dotlist overrides as the run")
    parser.add_argument("--checkpoint", default="checkpoint_best.pt", help="checkpoint file of each run to decode")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        sweep = sweep_spec.load(args.sweep, args.overrides)
        data = sweep.data_path
        clips = prepare_clips(sweep.dir / "pocketsphinx", data)
    except (sweep_spec.SpecError, DataError) as err:
        raise SystemExit(f"evaluate.py: error: {err}") from None

    rows, missing = [], []
    for run in sweep.runs():
        result = read_result(sweep, run) or {}
        folder = run_dir(sweep, run)
        checkpoint = folder / "checkpoints" / args.checkpoint
        if result.get("state") != FINISHED or not checkpoint.is_file():
            missing.append(f"{run.run_id} ({result.get('state', 'not started')})")
            continue
        print(f"[evaluate] {run.run_id}: decoding test and real clips with {checkpoint.name}", file=sys.stderr)
        row = {"run_id": run.run_id, "attention": run.attention, "seed": run.seed,
               "git_commit": result.get("git_commit"), "wall_time_s": result.get("wall_time_s")}  # fmt: skip
        row.update(training_stats(folder / "train.log"))
        row["train_minutes"] = row["s_per_update"] * row["updates"] / 60 if row["updates"] else math.nan
        scores = decode(checkpoint, data, "test", folder / "decode" / "test.txt")
        row.update(test_cer=scores["cer"], test_wer=scores["wer"])
        for split in REAL_SPLITS:
            scores = decode(checkpoint, clips, split, folder / "decode" / f"{split}.txt")
            row.update({f"{split}_cer": scores["cer"], f"{split}_wer": scores["wer"]})
        rows.append(row)

    out = sweep.dir
    with (out / "speech_results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    by_attention: dict[str, list[float]] = {}
    for r in rows:
        by_attention.setdefault(r["attention"], []).append(r["test_cer"])
    summary = {k: (statistics.mean(v), len(v)) for k, v in by_attention.items()}
    note = f"\n\nNot evaluated: {', '.join(missing)}" if missing else ""
    (out / "speech_results.md").write_text(f"# Sweep `{sweep.name}`: decoding\n\n{table}{note}\n")
    (out / "speech_results.json").write_text(json.dumps(
        {"rows": rows, "missing": missing, "test_cer_mean_by_attention": summary, "machine": machine(),
         "sweep": str(args.sweep), "overrides": args.overrides, "evaluate_seconds": round(time.time() - started, 1)},
        indent=1, default=str) + "\n")  # fmt: skip
    print(table + note)
    print(f"\nwrote {out / 'speech_results.md'}, {out / 'speech_results.csv'}, {out / 'speech_results.json'}")
    return rows


if __name__ == "__main__":
    main()
