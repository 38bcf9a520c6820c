"""ListOps: the generator's semantics, and a tiny end-to-end run of the real sweep file (data
preparation with fairseq-preprocess, a few updates of i-clustered attention through fairseq-sweep on
CPU, the report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.listops.generate import ListOpsSpec, depth, evaluate, example, tokens

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "listops" / "sweep.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(
    "tree, value",
    [
        (("MAX", [2, 9, ("MIN", [4, 7]), 0]), 9),
        (("MIN", [3, ("MAX", [1, 8]), 5]), 3),
        (("MED", [4, 1, 9]), 4),
        (("MED", [4, 1, 9, 6]), 5),  # even count: (4 + 6) / 2
        (("MED", [1, 2]), 1),  # 1.5 rounded down
        (("SM", [7, 8, ("SM", [9, 9])]), 3),  # 7 + 8 + 8 = 23
    ],
)
def test_evaluation(tree, value):
    assert evaluate(tree) == value


def test_tokens_are_prefix_brackets():
    assert tokens(("MAX", [2, 9, ("MIN", [4, 7]), 0])) == "[MAX 2 9 [MIN 4 7 ] 0 ]".split()


def test_examples_respect_the_spec_and_the_seed():
    spec = ListOpsSpec(max_depth=4, max_args=5, min_length=30, max_length=120)
    for index in range(40):
        label, toks = example(spec, seed=3, index=index)
        assert 30 <= len(toks) <= 120 and 0 <= label <= 9
        nesting, deepest = 0, 0
        for tok in toks:
            nesting += tok.startswith("[") - (tok == "]")
            deepest = max(deepest, nesting)
        assert nesting == 0 and 1 <= deepest <= 4
        assert set(toks) <= {"[MIN", "[MAX", "[MED", "[SM", "]", *map(str, range(10))}
    assert example(spec, 3, 7) == example(spec, 3, 7) and example(spec, 3, 7) != example(spec, 4, 7)


def test_lra_defaults_give_long_sequences():
    spec = ListOpsSpec()
    assert (spec.max_depth, spec.max_args, spec.max_length) == (10, 10, 2000)
    lengths = [len(example(spec, 1, i)[1]) for i in range(5)]
    assert all(500 <= n <= 2000 for n in lengths), lengths


def test_depth_helper():
    assert depth(3) == 0 and depth(("SM", [1, ("MIN", [2, 3])])) == 2


def test_tiny_sweep_end_to_end(tmp_path):
    """data.prepare (generate + fairseq-preprocess) -> fairseq-sweep run (8 updates, CPU) -> report."""
    data = tmp_path / "data"
    prepare = (f"{{python}} -m experiments.listops.prepare_data --out {data} --train 64 --valid 16 --test 16 "
               "--min-length 20 --max-length 100 --max-depth 4")  # fmt: skip
    overrides = [
        f"root={tmp_path / 'sweeps'}", f"data.path={data}", f"data.prepare=\"{prepare}\"",
        "arms=[{name: iclustered_c4_k8, arch: i_clustered_transformer, clusters: 4, topk: 8}]", "seeds=[1]",
        "fairseq.encoder_layers=2", "fairseq.encoder_embed_dim=32", "fairseq.encoder_ffn_embed_dim=64",
        "fairseq.encoder_attention_heads=2", "fairseq.max_positions=128", "fairseq.fp16=false", "fairseq.cpu=true",
        "fairseq.batch_size=16", "fairseq.required_batch_size_multiple=1", "fairseq.num_workers=0",
        "fairseq.warmup_updates=2", "fairseq.validate_interval_updates=4", "fairseq.save_interval_updates=4",
        "fairseq.log_interval=2", "resources.gpus_per_node=0", "resources.cpus_per_task=1", "resources.mem_gb=2",
        "budget.max_update=8",
    ]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "slurm", "run", str(SWEEP), *overrides], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    stamp = json.loads((data / "prepare.json").read_text())
    assert stamp["splits"]["train"]["expressions"] == 64 and stamp["splits"]["train"]["max_tokens"] <= 100
    assert (data / "label" / "dict.txt").read_text().split()[::2] == [str(c) for c in range(10)]
    result = json.loads((tmp_path / "sweeps" / "listops" / "iclustered_c4_k8_s1" / "result.json").read_text())
    assert result["state"] == "finished" and result["updates"] == 8, result
    assert 0 <= result["best_metric"] <= 100 and "--num-classes 10" in " ".join(result["command"])
    report = subprocess.run([sys.executable, "-m", "slurm", "report", str(SWEEP), *overrides], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "valid_accuracy" in (tmp_path / "sweeps" / "listops" / "results.md").read_text()
