"""--task associative_recall: the MQAR generator, its one-line option errors through the real
fairseq-train, its --help, and a learning check through fairseq-sweep (the local executor).

The learning check trains the softmax arm of the short ranking sweep and asks for a valid
accuracy that only recall reaches (see RECALL_MARGIN). Everything else runs in well under a second per
case, except the fairseq-train commands (about 3 s each: fairseq's start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fairseq_plugin.tasks.mqar import NOISE_SYMBOLS, RecallSpec, chance_accuracy, generate

from .runs import scalars

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLUGIN = REPO / "fairseq_plugin"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RECALL = ["--user-dir", str(PLUGIN), "--task", "associative_recall", "--criterion", "associative_recall", "--cpu",
          "--arch", "softmax_transformer", "--batch-size", "4", "--max-update", "1", "--no-save"]  # fmt: skip


def fairseq(tool: str, *args: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=timeout)  # fmt: skip


# --- the generator ----------------------------------------------------------------------------


@pytest.mark.parametrize("filler", ["blank", "noise"])
def test_sequences_hold_pairs_then_queries_with_their_values(filler):
    spec = RecallSpec(vocab_size=64, num_pairs=6, num_queries=10, length=100, filler=filler)
    half = spec.vocab_size // 2
    for index in range(50):
        tokens, answers = generate(spec, seed=7, index=index)
        assert tokens.shape == (100,) and answers.shape == (10,) and np.all(np.diff(answers) > 0)
        keys, values = tokens[0:12:2], tokens[1:12:2]
        assert len(set(keys)) == 6 and np.all(keys < half)
        assert len(set(values)) == 6 and np.all((values >= half) & (values < spec.vocab_size))
        value_of = dict(zip(keys, values))
        assert np.all(answers >= 13) and np.all((answers - 12) % 2 == 1)  # after the pairs, key then value
        for pos in answers:
            assert tokens[pos] == value_of[tokens[pos - 1]]
        assert len(set(tokens[answers - 1])) == 6  # 10 queries of 6 keys: every key asked
        rest = np.ones(100, dtype=bool)
        rest[:12], rest[answers], rest[answers - 1] = False, False, False
        if filler == "blank":
            assert np.all(tokens[rest] == spec.blank)
        else:
            assert np.all((tokens[rest] > spec.blank) & (tokens[rest] <= spec.blank + NOISE_SYMBOLS))


def test_a_seed_and_an_index_give_the_same_sequence():
    spec = RecallSpec(vocab_size=32, num_pairs=4, num_queries=4, length=40)
    a, pa = generate(spec, seed=1, index=5)
    b, pb = generate(spec, seed=1, index=5)
    assert np.array_equal(a, b) and np.array_equal(pa, pb)
    assert not np.array_equal(a, generate(spec, seed=2, index=5)[0])
    assert not np.array_equal(a, generate(spec, seed=1, index=6)[0])


def test_queries_follow_the_power_law():
    near = RecallSpec(vocab_size=64, num_pairs=4, num_queries=1, length=408, query_power=0.01)
    flat = RecallSpec(vocab_size=64, num_pairs=4, num_queries=1, length=408, query_power=1.0)
    gap = {s.query_power: np.mean([generate(s, 0, i)[1][0] for i in range(300)]) for s in (near, flat)}
    assert gap[0.01] < 0.5 * gap[1.0], gap  # uniform: mean position ~ 208; power 0.01: most queries near the pairs


def test_chance():
    assert chance_accuracy(RecallSpec(vocab_size=16, num_pairs=4)) == (0.125, 0.25)


@pytest.mark.parametrize(
    "spec, words",
    [
        (RecallSpec(vocab_size=8, num_pairs=5), "--num-pairs 5 is more than the vocabulary allows"),
        (RecallSpec(vocab_size=7), "--vocab-size must be an even integer"),
        (RecallSpec(num_pairs=8, num_queries=8, length=31), "--tokens-per-sample 31 is too short"),
        (RecallSpec(num_queries=0), "--num-queries must be >= 1"),
        (RecallSpec(query_power=0.0), "--query-power must be > 0"),
    ],
)
def test_bad_specs_name_the_option(spec, words):
    assert any(words in p for p in spec.problems()), spec.problems()


@pytest.mark.parametrize("predict_at, shift", [("value", 0), ("key", -1)])
def test_samples_mask_the_values_and_target_the_chosen_position(predict_at, shift):
    from fairseq_plugin.tasks.associative_recall import AssociativeRecallConfig, AssociativeRecallTask

    cfg = AssociativeRecallConfig(vocab_size=32, num_pairs=4, num_queries=4, tokens_per_sample=40,
                                  predict_at=predict_at)
    task = AssociativeRecallTask.setup_task(cfg)
    task.load_dataset("valid")
    sample = task.datasets["valid"][3]
    tokens, answers = generate(task.spec, seed=cfg.valid_seed, index=3)
    source, target = sample["source"], sample["target"]  # (40,): <s> first
    assert source[0] == task.dictionary.bos() and len(source) == 40
    assert (source[1:][answers] == task.mask_idx).all() and int((source == task.mask_idx).sum()) == 4
    pad = task.dictionary.pad()
    targets = target[1:][answers + shift]
    assert targets.tolist() == (tokens[answers] + task.dictionary.nspecial).tolist()
    assert int((target != pad).sum()) == 4
    assert [task.dictionary[i][0] for i in targets] == ["v"] * 4


# --- fairseq-train: options in --help, one-line errors ---------------------------------------------


def test_help_lists_the_task_options():
    proc = fairseq("fairseq-train", "--user-dir", PLUGIN, "--task", "associative_recall", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = ["--vocab-size", "--num-pairs", "--num-queries", "--tokens-per-sample", "--query-power", "--filler"]
    options += [f"--{split}-{what}" for split in ("train", "valid", "test") for what in ("size", "seed")]
    for option in options:
        assert option in proc.stdout, option
    assert "more than the vocabulary" not in proc.stdout
    assert "distinct keys, at most vocab-size / 2" in " ".join(proc.stdout.split())


@pytest.mark.parametrize(
    "args, words",
    [
        (["--vocab-size", "8", "--num-pairs", "5"], "--num-pairs 5 is more than the vocabulary allows: --vocab-size 8"),
        (["--num-pairs", "8", "--num-queries", "8", "--tokens-per-sample", "32"],
         "--tokens-per-sample 32 is too short: 8 pairs and 8 queries take 32 tokens plus 1 for <s>"),
        (["--tokens-per-sample", "1024", "--max-positions", "512"],
         "--tokens-per-sample 1024 is above the model's --max-positions 512"),
        (["--criterion", "cross_entropy"], "needs --criterion associative_recall"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors(tmp_path, args, words):
    proc = fairseq("fairseq-train", *RECALL, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: ") and words in last, last
    assert "num_updates" not in proc.stdout + proc.stderr  # nothing trained


# --- the learning check: the softmax arm really recalls, through fairseq-sweep ------------------

RANKING = REPO / "experiments" / "recall" / "ranking.yaml"
UPDATES = 1000
# experiments/recall/ranking.yaml (17 tokens, 4 pairs, 4 queries, V = 16; docs/results.md section 5),
# softmax arm: chance is 12.5 % (a uniform guess over the 8 values) and 25 % (answering with some value
# of the sequence); recall proper is above 25 %. Most model seeds stay on the 25 % plateau for 1,500
# updates and more (the phase transition MQAR is known for), so the check pins two seeds that
# recalled at every learning rate tried (1e-3 and 2e-3) on the development machine: at lr 2e-3 seed 3
# jumps to 100 % between updates 250 and 500, seed 6 between 500 and 750. 1,000 updates leave a margin
# for another CPU's rounding to move a jump; the two run side by side (the file's parallel: 2), so the
# second seed costs little wall time. The margin asks for more than twice the plateau in at least one
# of them: only a model that binds each query to its key's value reaches it.
RECALL_MARGIN = 60.0
SEEDS = (3, 6)


def test_softmax_arm_of_the_ranking_sweep_recalls(tmp_path):
    from experiments.recall.prepare import main as prepare

    data = prepare(["--out", str(tmp_path / "data"), "--vocab-size", "16"])
    overrides = [
        f"root={tmp_path / 'sweeps'}", f"data.path={data}", "data.prepare=null", "name=recall-ci",
        "arms=[{name: softmax, arch: softmax_transformer}]", f"seeds=[{','.join(map(str, SEEDS))}]",
        f"budget.max_update={UPDATES}",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "slurm", "run", str(RANKING), *overrides], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep_dir = tmp_path / "sweeps" / "recall-ci"
    curves = {}
    for seed in SEEDS:
        result = json.loads((sweep_dir / f"softmax_s{seed}" / "result.json").read_text())
        assert result["state"] == "finished" and result["updates"] == UPDATES, result
        command = " ".join(result["command"])
        assert "--task associative_recall" in command and "--predict-at key" in command and f"--seed {seed}" in command
        logged = scalars(sweep_dir / "tb" / f"softmax_s{seed}" / "valid")
        assert len(logged["accuracy"]) >= UPDATES // 250  # valid_accuracy in TensorBoard, every 250 updates
        assert max(logged["accuracy"]) == pytest.approx(result["best_metric"], abs=0.01)
        curves[seed] = [round(a, 1) for a in logged["accuracy"]]
    print(f"softmax valid accuracy by update, by seed: {curves} (chance 12.5 %, copy-a-value 25 %)")
    assert max(max(c) for c in curves.values()) >= RECALL_MARGIN, curves
    report = subprocess.run([sys.executable, "-m", "slurm", "report", str(RANKING), *overrides], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "valid_accuracy" in (sweep_dir / "results.md").read_text()


@pytest.mark.parametrize("init, low, high", [("bert", 0.01, 0.04), ("default", 0.5, 2.0)])
def test_encoder_init_reaches_the_weights(tmp_path, init, low, high):
    """--encoder-init default re-initialises every module with its own defaults (token embeddings
    N(0, 1)); bert keeps RoBERTa's N(0, 0.02). Read back from the checkpoint of one update."""
    from fairseq_plugin import checkpoints

    proc = subprocess.run(
        [str(BIN / "fairseq-train"), "--user-dir", str(REPO / "fairseq_plugin"), "--task", "associative_recall",
         "--criterion", "associative_recall", "--arch", "softmax_transformer", "--encoder-init", init,
         "--encoder-layers", "1", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
         "--encoder-attention-heads", "2", "--vocab-size", "16", "--num-pairs", "2", "--num-queries", "2",
         "--tokens-per-sample", "16", "--max-positions", "16", "--train-size", "64", "--valid-size", "8",
         "--batch-size", "8", "--optimizer", "adam", "--lr", "1e-9", "--max-update", "1", "--cpu",
         "--required-batch-size-multiple", "1", "--num-workers", "0", "--no-progress-bar",
         "--save-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = checkpoints.load(tmp_path / "ckpt" / "checkpoint_last.pt")
    assert state["cfg"]["model"].encoder_init == init
    weight = state["model"]["encoder.sentence_encoder.embed_tokens.weight"]
    assert low < float(weight[4:].std()) < high, float(weight[4:].std())
