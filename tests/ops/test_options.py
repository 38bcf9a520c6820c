"""fairseq_plugin.ops.options is the one definition of each option: everything else derives from it.

The functional API's keyword defaults, fairseq's command-line options, the hardmax model's alpha
and the benchmark's parser are checked against the table; an out-of-bounds value gives the same
words from the API and the command line; and the Python bounds agree with the kernels' own checks
(each kernel is called at the bound and one past it).
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_plugin import ops
from fairseq_plugin.ops import compiled, options
from fairseq_plugin.ops.kmeans import draw_kmeans_seeds

from . import gen

REPO = Path(__file__).resolve().parents[2]
OPTIONS = options.OPTIONS
FUNCTIONS = [ops.full_attention, ops.clustered_attention, ops.improved_clustered_attention, ops.hardmax_attention,
             ops.hamming_kmeans, ops.draw_planes]  # fmt: skip


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_functional_defaults_are_the_options(fn):
    params = inspect.signature(fn).parameters
    named = [p for p in params.values() if p.name in OPTIONS]
    assert named, f"{fn.__name__} takes none of the options"
    for p in named:
        if p.default is inspect.Parameter.empty:  # required (clusters, hash_bits of hamming_kmeans)
            continue
        assert p.default == OPTIONS[p.name].default, (fn.__name__, p.name, p.default)


def test_every_option_reaches_the_api():
    covered = {p for fn in FUNCTIONS for p in inspect.signature(fn).parameters}
    assert set(OPTIONS) <= covered, set(OPTIONS) - covered


def test_fairseq_options_derive_from_the_table():
    from fairseq_plugin.config import AttentionConfig

    cli_name = {"iterations": "cluster_iterations", "temperature": "hardmax_temperature",
                "tie_tolerance": "hardmax_tie_tolerance"}  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(AttentionConfig)}
    for name, opt in OPTIONS.items():
        if name == "alpha":
            continue  # a model option of the hardmax model (below)
        f = fields[cli_name.get(name, name)]
        expected = opt.default if opt.model_default is None else opt.model_default
        assert f.default == expected and f.metadata["help"] == opt.help and f.metadata["parse"] == opt.parse, name


def test_hardmax_model_alpha_derives_from_the_table():
    pytest.importorskip("fairseq")
    from fairseq_plugin.models.hardmax import MODEL_OPTIONS

    alpha, model = OPTIONS["alpha"], MODEL_OPTIONS["hardmax_alpha"]
    assert model.default == alpha.model_default and (model.low, model.open_low) == (alpha.low, alpha.open_low)
    with pytest.raises(ValueError, match=r"must be a number > 0 \(got 0.0\)"):
        model.parse("0")


def test_out_of_bounds_is_the_same_words_from_the_api_and_the_command_line():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError) as api:
        ops.clustered_attention(q, q, q, clusters=2, hash_bits=64)
    assert str(api.value) == "hash_bits must be an integer in 1..63 (got 64)"
    bench = subprocess.run([sys.executable, "experiments/benchmarks/attention.py", "--hash-bits", "64"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bench.returncode == 2
    assert bench.stderr.strip().splitlines()[-1].endswith("argument --hash-bits: must be an integer in 1..63 (got 64)")
    with pytest.raises(TypeError, match="topk must be an integer >= 1, got float"):
        ops.improved_clustered_attention(q, q, q, clusters=2, topk=2.0)


def test_cluster_info_carries_the_effective_number_of_clusters():
    q = torch.randn(2, 1, 5, 4)
    _, info = ops.improved_clustered_attention(q, q, q, clusters=9, topk=2, generator=gen(0), return_clusters=True)
    assert info.clusters == 5 == info.counts.shape[-1]
    _, info = ops.clustered_attention(q, q, q, clusters=3, generator=gen(0), return_clusters=True)
    assert info.clusters == 3


OPS = torch.ops.fairseq_clustered


def _kmeans(hash_bits):
    codes = torch.randint(0, 2**20, (1, 1, 6), generator=gen(0))
    init, reseed = draw_kmeans_seeds(1, 1, 6, 2, 1, torch.zeros(1, 6, dtype=torch.bool), gen(1), codes.device)
    return OPS.hamming_kmeans(codes, init, reseed, None, hash_bits)


@pytest.mark.parametrize(
    "name, at_bound, past_bound",
    [
        ("hash_bits", lambda: _kmeans(OPTIONS["hash_bits"].high), lambda: _kmeans(OPTIONS["hash_bits"].high + 1)),
        ("hash_bits", lambda: _kmeans(OPTIONS["hash_bits"].low), lambda: _kmeans(OPTIONS["hash_bits"].low - 1)),
        ("clusters", lambda: OPS.cluster_sum(torch.randn(1, 1, 3, 2), torch.zeros(1, 1, 3, dtype=torch.int64),
                                             OPTIONS["clusters"].low),
         lambda: OPS.cluster_sum(torch.randn(1, 1, 3, 2), torch.zeros(1, 1, 3, dtype=torch.int64),
                                 OPTIONS["clusters"].low - 1)),
        ("topk", lambda: OPS.softmax_topk(torch.randn(1, 1, 2, 5), None, OPTIONS["topk"].low),
         lambda: OPS.softmax_topk(torch.randn(1, 1, 2, 5), None, OPTIONS["topk"].low - 1)),
    ],
)  # fmt: skip
def test_python_bounds_are_the_kernels_bounds(name, at_bound, past_bound):
    """The csrc/ kernels accept an option at its Python bound and refuse it one past."""
    assert compiled.load(), compiled.load_error()
    at_bound()
    with pytest.raises(RuntimeError, match=name):
        past_bound()
