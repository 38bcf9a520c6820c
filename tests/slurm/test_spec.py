"""Sweep files: validation errors are one line naming the key; expansion is deterministic."""

from __future__ import annotations

import pytest

from slurm.cli import main
from slurm.spec import SpecError, fairseq_argv, load

from .conftest import tiny_sweep


def error_of(path, *overrides, **kw) -> str:
    with pytest.raises(SpecError) as info:
        load(path, list(overrides), **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ngrid: {arch: [a, b}\n")
    assert "malformed YAML at line 2" in error_of(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "mapping" in error_of(path)


def test_unknown_top_and_nested_keys(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, gird={"arch": ["x"]})
    assert "unknown key 'gird'" in error_of(path)
    path = tiny_sweep(tmp_path / "s.yaml", corpus, resources__gpus=2)
    assert "unknown key 'resources.gpus'" in error_of(path)
    path = tiny_sweep(tmp_path / "s.yaml", corpus, budget__max_updates=3)
    assert "unknown key 'budget.max_updates'" in error_of(path)


def test_unknown_arch_checked_against_fairseq_registry(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, grid={"arch": ["clustered_transformer", "clusterd_transformer"]})
    message = error_of(path)
    assert "key 'arch'" in message and "'clusterd_transformer'" in message
    load(tiny_sweep(tmp_path / "ok.yaml", corpus))  # the registered ones pass


def test_missing_data_without_prepare(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", tmp_path / "nowhere")
    assert "key 'data.path'" in error_of(path)
    with_prepare = tiny_sweep(tmp_path / "p.yaml", tmp_path / "nowhere", data__prepare="true")
    load(with_prepare)  # it will be prepared at launch


def test_bad_values_name_their_key(tmp_path, corpus):
    assert "'budget'" in error_of(tiny_sweep(tmp_path / "a.yaml", corpus, budget={}))
    assert "'resources.nodes'" in error_of(tiny_sweep(tmp_path / "b.yaml", corpus, resources__nodes=0))
    assert "'fairseq.save_dir'" in error_of(tiny_sweep(tmp_path / "c.yaml", corpus, fairseq__save_dir="/x"))
    assert "'grid.clusters'" in error_of(tiny_sweep(tmp_path / "d.yaml", corpus, grid={"clusters": 4}))
    assert "'seeds'" in error_of(tiny_sweep(tmp_path / "e.yaml", corpus, seeds="one"))
    assert "missing key 'task'" in error_of(tiny_sweep(tmp_path / "f.yaml", corpus, task=None))


def test_dotlist_overrides_and_expansion(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, arms=[{"name": "big", "encoder_layers": 2}, {"name": "small"}])
    sweep = load(path, ["model.clusters=6", "seeds=[1,2]", "budget.gpu_hours=0.5", "resources.gpus_per_node=2"],
                 check_arch=True)  # fmt: skip
    ids = [r.run_id for r in sweep.runs()]
    assert ids == ["big_softmax_s1", "big_softmax_s2", "big_clustered_s1", "big_clustered_s2",
                   "small_softmax_s1", "small_softmax_s2", "small_clustered_s1", "small_clustered_s2"]  # fmt: skip
    run = sweep.runs()[0]
    assert run.args["clusters"] == 6 and run.args["encoder_layers"] == 2 and run.attention == "softmax"
    argv = fairseq_argv(sweep, run, tmp_path / "r", tmp_path / "tb", tmp_path)
    assert argv[argv.index("--clusters") + 1] == "6"
    assert argv[argv.index("--stop-time-hours") + 1] == "0.250000"  # 0.5 GPU-hours over 2 GPUs
    assert argv[argv.index("--seed") + 1] == "1" and "--cpu" in argv
    assert "unknown key 'modle'" in error_of(path, "modle.clusters=3")


def test_cli_prints_one_line_error_and_exits_2(tmp_path, corpus, capsys):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, resources__gpu=1)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'resources.gpu'" in err
    assert not (tmp_path / "sweeps").exists()  # nothing was created, let alone submitted
