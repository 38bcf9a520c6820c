"""experiments/hardmax, reduced end to end: float64 dynamics (convergence to the leaders, the
1/(1+alpha) tail, emerging leaders), the Rotten Tomatoes data through fairseq-preprocess, the real
sweep file trained for a few dozen updates through the launcher, the report, test accuracy, the
exact hardmax at evaluation checked against an independent computation, and the plots read back.

The sentiment snippets come from the vaderSentiment sdist (experiments/sentiment_data.py, PyPI once).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.hardmax import dynamics

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SWEEP = REPO / "experiments" / "hardmax" / "sentiment.yaml"
LIMITS = {"train": 480, "valid": 96, "test": 96}
UPDATES = 40


def run(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


# --- dynamics ----------------------------------------------------------------------------------


def small(name: str) -> dynamics.Case:
    return next(case for case in dynamics.small_cases() if case.name == name)


def independent_layer(z: torch.Tensor, A, alpha: float) -> torch.Tensor:
    """One hardmax layer in plain float64 torch, written out without the op under test."""
    az = z if A is None else z @ A
    scores = az @ z.T  # (T, T)
    best = scores.max(-1, keepdim=True).values
    sets = (scores >= best).double()
    return (z + alpha * (sets @ z) / sets.sum(-1, keepdim=True)) / (1 + alpha)


@pytest.mark.parametrize("case", [
    small("triangle"),
    small("chain"),
    small("seed13_n20"),
    dynamics.Case("random_d3_spd", dynamics.random_points(20, 3, 101), 0.5, A=dynamics.random_spd(3, 201), a_kind="spd"),
    dynamics.Case("random_d2_I_a2", dynamics.random_points(20, 2, 100), 2.0),
], ids=lambda case: case.name)  # fmt: skip
def test_dynamics_converge_to_leaders_with_the_predicted_tail(case):
    sim = dynamics.simulate(case.z0, case.alpha, case.A, 200)
    # the op-driven simulation follows an independent float64 implementation of the layer
    z = case.z0
    for layer in range(1, 41):
        z = independent_layer(z, case.A, case.alpha)
        if layer in (1, 5, 40):
            torch.testing.assert_close(sim.traj[layer, 0], z, rtol=1e-10, atol=1e-10)
    row = dynamics.analyse(case, sim)
    assert row["converged"], row
    assert row["max_dist_to_limit_leader"] < 1e-9 and row["equilibrium"]
    # every token ends at a point that is a strict leader of the limit configuration: recheck by hand
    final = sim.traj[-1, 0]
    points = torch.unique(final.round(decimals=8), dim=0)
    assert len(points) == row["limit_points"] < len(final)
    assert bool(dynamics.strict_leaders(points, case.A).all())
    assert float(torch.cdist(final, points).amin(-1).max()) < 1e-7
    # the tail contracts by 1/(1+alpha) per layer
    assert row["tail_samples"] >= 10
    assert abs(row["tail_ratio_median"] * (1 + case.alpha) - 1) < 1e-3, row
    assert row["tail_ratio_max_rel_dev"] < 0.05, row
    expected_new = {"triangle": "", "chain": "0@1", "seed13_n20": "8@1"}.get(case.name, "")
    assert row["new_leaders"] == expected_new, row
    assert row["limit_is_initial_leaders"] == (expected_new == "")


def test_dynamics_checks_can_fail():
    """The checks are not tautologies: too few layers is not converged, and a token stuck on a symmetric
    tie between two leaders (at their midpoint, a fixed point of the layer) did not reach a leader."""
    case = dynamics.Case("short", dynamics.random_points(20, 2, 100), 0.5)
    short = dynamics.analyse(case, dynamics.simulate(case.z0, 0.5, None, 12))
    assert not short["converged"] and short["max_dist_to_limit_leader"] > 1e-3 and short["layers_to_1e-9"] is None
    tie = small("symmetric_tie")
    row = dynamics.analyse(tie, dynamics.simulate(tie.z0, tie.alpha, None, 200))
    assert not row["converged"] and row["last_step"] == 0.0  # it stopped moving ...
    torch.testing.assert_close(row["max_dist_to_limit_leader"], 2.0)  # ... at the midpoint, 2 from either leader
    with pytest.raises(TypeError, match="float64"):
        dynamics.simulate(tie.z0.float(), 1.0, None, 3)


def test_dynamics_program_writes_tables_and_plots(tmp_path):
    proc = run(PY, "-m", "experiments.hardmax.dynamics", "--out", tmp_path, "--population", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[dynamics] 1/" in proc.stderr and "population d=16" in proc.stderr
    rows = list(csv.DictReader((tmp_path / "dynamics.csv").open()))
    assert len(rows) == len(dynamics.small_cases()) + len(dynamics.random_cases())
    assert all(r["converged"] == "True" for r in rows if r["case"] != "symmetric_tie")
    assert "| seed13_n20 |" in (tmp_path / "dynamics.md").read_text()
    pop = list(csv.DictReader((tmp_path / "population.csv").open()))
    assert len(pop) == 8 and all(int(r["converged"]) == 4 for r in pop)
    from PIL import Image

    for name in ("triangle.png", "seed13_n20.png", "chain.gif"):
        with Image.open(tmp_path / "plots" / name) as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 300


# --- sentiment ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hardmax") / "data"
    args = ["-m", "experiments.hardmax.prepare_data", "--out", out, *(f"--limit-{k}={v}" for k, v in LIMITS.items())]
    proc = run(PY, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[hardmax-data] train: 480 sentences" in proc.stderr and "wrote" in proc.stderr  # progress output
    stamp = (out / "prepare.json").stat().st_mtime_ns
    again = run(PY, *args)
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-2000:]
    assert (out / "prepare.json").stat().st_mtime_ns == stamp  # the rerun wrote nothing
    for split, count in LIMITS.items():
        labels = (out / "raw" / f"{split}.label").read_text().split()
        assert len(labels) == count and set(labels) == {"0", "1"}
    return out


@pytest.fixture(scope="module")
def sweep(data, tmp_path_factory):
    """The real sweep file, shrunk to d = 2 and a few dozen updates: three arms, one seed."""
    root = tmp_path_factory.mktemp("sweeps")
    overrides = [f"root={root}", f"data.path={data}", "data.prepare=null", "grid.encoder_embed_dim=[2]", "seeds=[1]",
                 "budget.max_epoch=null", f"budget.max_update={UPDATES}", "resources.parallel=2"]  # fmt: skip
    proc = run(PY, "-m", "slurm", "run", SWEEP, *overrides, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root / "hardmax-sentiment", overrides


RUNS = ["hardmax_encoder_embed_dim2_s1", "hardmax_alpha1_encoder_embed_dim2_s1", "softmax_encoder_embed_dim2_s1"]


def test_sweep_trains_reports_and_evaluates(sweep):
    sweep_dir, overrides = sweep
    for run_id in RUNS:
        result = json.loads((sweep_dir / run_id / "result.json").read_text())
        assert result["state"] == "finished" and result["updates"] == UPDATES, result
        assert math.isfinite(result["final_metric"]) and 0 <= result["final_metric"] <= 100  # valid accuracy (%)
        assert "sentence_prediction" in result["command"]
    report = run(PY, "-m", "slurm", "report", SWEEP, *overrides)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "valid_accuracy" in (sweep_dir / "results.md").read_text()

    evaluate = run(PY, "-m", "experiments.hardmax.evaluate", SWEEP, *overrides)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    rows = {r["run_id"]: r for r in csv.DictReader((sweep_dir / "hardmax_results.csv").open())}
    assert set(rows) == set(RUNS)
    for run_id, row in rows.items():
        for key in ("valid_acc", "test_acc"):
            assert math.isfinite(float(row[key])) and 0 <= float(row[key]) <= 100, row
        # the recomputed valid accuracy of the best checkpoint is fairseq's own (exact hardmax in both)
        assert abs(float(row["valid_acc"]) - float(row["best_epoch_valid_acc"])) < 0.11, row
    assert rows["hardmax_alpha1_encoder_embed_dim2_s1"]["variant"] == "hardmax, alpha fixed at 1"
    assert float(rows["hardmax_alpha1_encoder_embed_dim2_s1"]["alpha"]) == 1.0
    assert rows["hardmax_encoder_embed_dim2_s1"]["variant"] == "hardmax, alpha trained"
    assert float(rows["hardmax_encoder_embed_dim2_s1"]["alpha"]) != 1.0
    assert rows["softmax_encoder_embed_dim2_s1"]["attention"] == "softmax"
    assert "| hardmax, alpha fixed at 1 | 2 | 1 |" in (sweep_dir / "hardmax_results.md").read_text()


def direct_logits(state: dict, src: torch.Tensor, special: list, layers: int, temperature=None) -> torch.Tensor:
    """The pure-attention classifier computed from the checkpoint's tensors alone, in float64:
    exact hardmax (ties share) or softmax(scores / temperature), one sentence at a time (no padding)."""
    emb = state["embed_tokens.weight"].double()
    b = state["layer.factor"].double()
    A = b @ b.T + 0.01 * torch.eye(b.shape[0], dtype=torch.float64)
    alpha = float(state["layer.log_alpha"].double().exp())
    w = state["classification_heads.sentence_classification_head.weight"].double()
    bias = state["classification_heads.sentence_classification_head.bias"].double()
    out = []
    for row in src:
        words = [t for t in row.tolist() if t not in special]
        z = emb[words]
        for _ in range(layers):
            scores = (z @ A) @ z.T
            if temperature is None:
                weights = (scores >= scores.max(-1, keepdim=True).values).double()
                weights = weights / weights.sum(-1, keepdim=True)
            else:
                weights = torch.softmax(scores / temperature, -1)
            z = (z + alpha * weights @ z) / (1 + alpha)
        out.append(z.mean(0) @ w.T + bias)
    return torch.stack(out)


def test_eval_is_the_exact_hardmax(sweep, data):
    from experiments.hardmax.evaluate import HEAD, load_model, read_split

    sweep_dir, _ = sweep
    checkpoint = sweep_dir / "hardmax_alpha1_encoder_embed_dim2_s1" / "checkpoints" / "checkpoint_best.pt"
    model, task = load_model(checkpoint, data)
    model.double()
    test = read_split(task, "test")
    pad = task.source_dictionary.pad()
    src = torch.nn.utils.rnn.pad_sequence(test.tokens, batch_first=True, padding_value=pad)  # (96, L), padded
    state = model.state_dict()
    special = model.special
    with torch.no_grad():
        evaluated, _ = model(src, classification_head_name=HEAD)
    exact = direct_logits(state, src, special, model.num_layers)
    torch.testing.assert_close(evaluated, exact, rtol=1e-9, atol=1e-9)  # eval = exact hardmax, padding masked
    soft = direct_logits(state, src, special, model.num_layers, temperature=1.0)
    assert float((evaluated - soft).abs().max()) > 1e-3  # the comparison can tell attention types apart
    model.train()
    with torch.no_grad():
        trained, _ = model(src, classification_head_name=HEAD)  # training attention: softmax at T = 0.001
    torch.testing.assert_close(trained, direct_logits(state, src, special, model.num_layers, temperature=0.001),
                               rtol=1e-7, atol=1e-7)  # fmt: skip
    accuracy = float((exact.argmax(-1) == test.labels).double().mean())
    assert 0 <= accuracy <= 1


def test_leader_words_and_token_plots(sweep):
    sweep_dir, overrides = sweep
    proc = run(PY, "-m", "experiments.hardmax.leaders", SWEEP, *overrides, "--confidence", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sweep_dir / "leaders"
    summary = json.loads((out / "summary.json").read_text())["by_run"]
    assert set(summary) == {"hardmax_d2", "hardmax_alpha1_d2"}
    for tag, info in summary.items():
        assert info["confident_correct"] > 0 and info["leaders_per_sentence"] >= 1  # every sentence has a leader
        rows = list(csv.DictReader((out / f"leader_words_{tag}.csv").open()))
        assert rows and all(0 < float(r["leader_rate"]) <= 1 for r in rows)
    from PIL import Image

    for name in ("leader_words_hardmax_alpha1_d2.png", "tokens_hardmax_alpha1_d2.png", "tokens_hardmax_alpha1_d2_examples.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.size[0] > 400 and image.size[1] > 300
