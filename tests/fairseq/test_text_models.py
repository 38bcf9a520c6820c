"""The text models train, resume, reload and log through the real fairseq command-line tools.

Every run is a subprocess of the venv's fairseq-train / fairseq-validate on a tiny dataset made
by fairseq-preprocess (tests/fairseq/data.py), on CPU. Trained runs are cached per module so that
the resume, reload and TensorBoard tests share them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

from fairseq_plugin import checkpoints

from .data import masked_lm_data, sentence_prediction_data
from .runs import RECORD, Run, scalars

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLUGIN = REPO / "fairseq_plugin"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

TINY = [
    "--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--max-positions", "128",
]  # fmt: skip
COMMON = [
    "--user-dir", str(PLUGIN), "--cpu", "--required-batch-size-multiple", "1", "--no-progress-bar",
    "--log-format", "json", "--log-interval", "1", "--seed", "1", "--optimizer", "adam", "--lr", "1e-3",
    "--batch-size", "8", "--num-workers", "0",
]  # fmt: skip
# Small enough that clustering matters at 128 tokens (clusters < length, topk < length).
ATTENTION = ["--clusters", "4", "--topk", "8", "--cluster-iterations", "3"]
STAT_OF_ARCH = {
    "clustered_transformer": "attn_cluster_size_cv",
    "i_clustered_transformer": "attn_topk_mass",
    "hardmax_transformer": "attn_hardmax_leaders",
}
ARCHS = ["softmax_transformer", "clustered_transformer", "i_clustered_transformer", "hardmax_transformer"]

def run_tool(tool: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout
    )


def train(data: Path, save_dir: Path, *args: str) -> Run:
    tb_dir = save_dir.parent / f"{save_dir.name}-tb"
    proc = run_tool("fairseq-train", data, *COMMON, *args, "--save-dir", save_dir, "--tensorboard-logdir", tb_dir)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return Run(save_dir, tb_dir, output)


def assert_allowlisted(save_dir: Path) -> None:
    """A checkpoint's types outside torch's weights_only set are exactly the plugin's allowlist."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in checkpoints.SAFE_GLOBALS}
    registered = torch.serialization.get_safe_globals()  # the plugin may have added its allowlist here
    torch.serialization.clear_safe_globals()  # so that the check sees torch's own defaults only
    try:
        for path in sorted(save_dir.glob("checkpoint*.pt")):
            assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) == allowed, path
    finally:
        torch.serialization.add_safe_globals(registered)


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory) -> Path:
    return masked_lm_data(tmp_path_factory.mktemp("mlm"))


@pytest.fixture(scope="module")
def mlm_run(mlm_data, tmp_path_factory):
    """mlm_run(arch) trains ``arch`` for 4 updates on masked_lm once per module."""
    cache: Dict[str, Run] = {}
    root = tmp_path_factory.mktemp("mlm-runs")

    def get(arch: str) -> Run:
        if arch not in cache:
            cache[arch] = train(
                mlm_data, root / arch, "--task", "masked_lm", "--criterion", "masked_lm", "--arch", arch,
                *TINY, *ATTENTION, "--tokens-per-sample", "128", "--max-update", "4",
            )  # fmt: skip
        return cache[arch]

    return get


def assert_finite_training(run: Run, updates: int) -> None:
    inner = run.records("train_inner")
    assert [int(r["num_updates"]) for r in inner] == list(range(1, updates + 1)), run.output[-3000:]
    losses = [float(r["loss"]) for r in inner]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    valid = run.records("valid")
    assert valid and math.isfinite(float(valid[-1]["valid_loss"])), run.output[-3000:]



@pytest.mark.parametrize("arch", ARCHS)
def test_masked_lm_trains_and_logs_to_tensorboard(mlm_run, arch):
    run = mlm_run(arch)
    assert_finite_training(run, updates=4)
    assert (run.save_dir / "checkpoint_last.pt").is_file()
    assert_allowlisted(run.save_dir)

    inner, valid = scalars(run.tb_dir / "train_inner"), scalars(run.tb_dir / "valid")
    assert len(inner["loss"]) == 4 and all(math.isfinite(x) for x in inner["loss"])
    stat = STAT_OF_ARCH.get(arch)
    logged = {k for k in inner if k.startswith("attn_")}
    if stat is None:
        assert not logged, f"softmax attention logs no attention statistics, got {logged}"
        return
    assert stat in inner and stat in valid, sorted(inner)
    values = inner[stat] + valid[stat]
    assert len(inner[stat]) == 4 and all(math.isfinite(x) for x in values), values
    if stat == "attn_cluster_size_cv":
        assert all(x >= 0 for x in values)
    else:  # a mass or a fraction
        assert all(0 < x <= 1 for x in values), values
    if arch == "i_clustered_transformer":  # topk 8 of 128 keys: an approximation, not all of the mass
        assert all(x < 0.999 for x in inner[stat]), inner[stat]
        assert "attn_cluster_size_cv" in inner


def test_checkpoint_activations_recompute_the_same_clustering(mlm_run, mlm_data, tmp_path):
    """--checkpoint-activations with i-clustered layers: the backward recomputes each layer with
    the forward's random state, so training is the same update for update."""
    plain = mlm_run("i_clustered_transformer")
    run = train(
        mlm_data, tmp_path / "ckpt", "--task", "masked_lm", "--criterion", "masked_lm", "--arch", "i_clustered_transformer",
        *TINY, *ATTENTION, "--tokens-per-sample", "128", "--max-update", "4", "--checkpoint-activations",
    )  # fmt: skip
    losses = [r["loss"] for r in run.records("train_inner")]
    assert len(losses) == 4 and losses == [r["loss"] for r in plain.records("train_inner")], losses
    assert "checkpoint_activations=True" in run.output


@pytest.fixture(scope="module")
def sp_data(tmp_path_factory) -> Path:
    return sentence_prediction_data(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("arch", ["softmax_transformer", "i_clustered_transformer"])
def test_sentence_prediction_trains(sp_data, tmp_path, arch):
    run = train(
        sp_data, tmp_path / "ckpt", "--task", "sentence_prediction", "--criterion", "sentence_prediction",
        "--num-classes", "2", "--arch", arch, *TINY, *ATTENTION, "--max-update", "4",
    )  # fmt: skip
    assert_finite_training(run, updates=4)
    valid = run.records("valid")[-1]
    assert 0 <= float(valid["valid_accuracy"]) <= 100, valid
    assert_allowlisted(run.save_dir)
    model = load(run.save_dir / "checkpoint_last.pt")[0]
    assert "sentence_classification_head" in model.classification_heads


def load(path: Path, **overrides):
    from fairseq import checkpoint_utils

    import fairseq_plugin

    fairseq_plugin.register()  # as --user-dir does

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=overrides or None)
    return models[0].eval(), cfg, task


def test_checkpoint_resumes(mlm_run, mlm_data, tmp_path):
    first = mlm_run("softmax_transformer")
    save_dir = tmp_path / "resumed"
    shutil.copytree(first.save_dir, save_dir)
    run = train(
        mlm_data, save_dir, "--task", "masked_lm", "--criterion", "masked_lm", "--arch", "softmax_transformer",
        *TINY, "--tokens-per-sample", "128", "--max-update", "6",
    )  # fmt: skip
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", run.output), run.output[-3000:]
    assert [int(r["num_updates"]) for r in run.records("train_inner")] == [5, 6]
    assert checkpoints.load(save_dir / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 6


def test_checkpoint_reloads_with_its_attention(mlm_run):
    from fairseq_plugin.models.text import EfficientRobertaModel
    from fairseq_plugin.modules import EfficientSelfAttention

    run = mlm_run("clustered_transformer")
    model, cfg, task = load(run.save_dir / "checkpoint_last.pt")
    assert isinstance(model, EfficientRobertaModel)
    assert cfg.model.arch == "clustered_transformer" and task.cfg._name == "masked_lm"
    attn = [m for m in model.modules() if isinstance(m, EfficientSelfAttention)]
    assert len(attn) == 2
    assert {(a.attention_cfg.attention_type, a.attention_cfg.clusters, a.attention_cfg.topk) for a in attn} == {("clustered", 4, 8)}


def batch(task, n_real=(40, 33, 21)) -> torch.Tensor:
    """(B, T) tokens of the task's dictionary, right-padded, starting with <s>."""
    d = task.source_dictionary
    gen = torch.Generator().manual_seed(0)
    tokens = torch.full((len(n_real), max(n_real)), d.pad())
    for row, n in enumerate(n_real):
        tokens[row, :n] = torch.randint(d.nspecial, len(d), (n,), generator=gen)
        tokens[row, 0] = d.bos()
    return tokens


def features(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, features_only=True)[0]  # (B, T, C)


def test_load_time_override_changes_the_attention(mlm_run):
    """A softmax checkpoint read as i_clustered with topk >= length is the same model (the
    exactness oracle, through the real encoder); read as clustered it is not.

    After 4 updates the attention is nearly uniform, where every approximation is close to exact,
    so all three loads sharpen it with the same softmax_temp override."""
    path = mlm_run("softmax_transformer").save_dir / "checkpoint_last.pt"
    sharp = {"softmax_temp": 100.0}
    softmax, _, task = load(path, **sharp)
    assert softmax.encoder.sentence_encoder.layers[0].self_attn.attention_cfg.attention_type == "softmax"
    tokens = batch(task)
    real = tokens.ne(task.source_dictionary.pad())
    reference = features(softmax, tokens)[real]  # (real tokens, C)

    exact, cfg, _ = load(path, attention_type="i_clustered", clusters=3, topk=128, **sharp)
    assert cfg.model.attention_type == "i_clustered" and cfg.model.arch == "softmax_transformer"
    layer_cfg = exact.encoder.sentence_encoder.layers[0].self_attn.attention_cfg
    assert (layer_cfg.attention_type, layer_cfg.clusters, layer_cfg.topk) == ("i_clustered", 3, 128)
    torch.testing.assert_close(features(exact, tokens)[real], reference, rtol=1e-5, atol=1e-5)

    clustered, _, _ = load(path, attention_type="clustered", clusters=3, **sharp)
    assert clustered.encoder.sentence_encoder.layers[1].self_attn.attention_cfg.attention_type == "clustered"
    assert (features(clustered, tokens)[real] - reference).abs().max() > 1e-2


def test_train_time_override_beats_the_architecture(mlm_data, tmp_path):
    run = train(
        mlm_data, tmp_path / "ckpt", "--task", "masked_lm", "--criterion", "masked_lm",
        "--arch", "clustered_transformer", "--attention-type", "i_clustered", "--hash-bits", "16",
        *TINY, *ATTENTION, "--tokens-per-sample", "128", "--max-update", "2",
    )  # fmt: skip
    assert "attn_topk_mass" in run.records("train_inner")[-1]
    model, cfg, _ = load(run.save_dir / "checkpoint_last.pt")
    assert (cfg.model.attention_type, cfg.model.hash_bits, cfg.model.clusters) == ("i_clustered", 16, 4)
    assert model.encoder.sentence_encoder.layers[0].self_attn.attention_cfg.hash_bits == 16


def test_validate_with_model_overrides(mlm_run, mlm_data):
    path = mlm_run("softmax_transformer").save_dir / "checkpoint_last.pt"
    proc = run_tool(
        "fairseq-validate", mlm_data, "--user-dir", PLUGIN, "--task", "masked_lm", "--cpu", "--path", path,
        "--batch-size", "8", "--log-format", "json", "--required-batch-size-multiple", "1",
        "--model-overrides", "{'attention_type': 'hardmax', 'hardmax_tie_tolerance': 0.5}",
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    # fairseq-validate prints the configuration it built the model from
    assert "attention_type='hardmax'" in output and "hardmax_tie_tolerance=0.5" in output, output[-3000:]
    valid = [json.loads(m.group(2)) for line in output.splitlines() if (m := RECORD.search(line))]
    assert valid and math.isfinite(float(valid[-1]["valid_loss"])), output[-3000:]


def test_help_lists_attention_options(tmp_path):
    proc = run_tool(
        "fairseq-train", tmp_path, "--user-dir", PLUGIN, "--task", "masked_lm", "--arch", "clustered_transformer", "--help"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    help_text = " ".join(proc.stdout.split())  # argparse wraps lines
    for option, text in [
        ("--attention-type", "i_clustered (improved clustered"),
        ("--clusters", "query clusters C per head"),
        ("--hash-bits", "random-hyperplane hash"),
        ("--cluster-iterations", "Lloyd iterations"),
        ("--topk", "keys per cluster attended exactly"),
        ("--hash-bias", "(default: True)"),
    ]:
        assert option in help_text and text in help_text, option
    assert "--arch clustered_transformer sets, unless given:" in help_text and "attention_type=clustered," in help_text


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--hash-bits", "64", "argument --hash-bits: must be an integer in 1..63 (got 64)"),
        ("--attention-type", "foo", "argument --attention-type: must be one of softmax, clustered, i_clustered, hardmax"),
    ],
)
def test_bad_attention_option_is_a_one_line_error(tmp_path, option, value, message):
    proc = run_tool(
        "fairseq-train", tmp_path, "--user-dir", PLUGIN, "--task", "masked_lm", "--arch", "clustered_transformer",
        option, value, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error:") and message in last, last
