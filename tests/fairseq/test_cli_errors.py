"""User-facing errors of fairseq's command-line tools with the plugin loaded are one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .speech_data import make_speech_data

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _train(*args, cwd=REPO, env=None):
    return subprocess.run(
        [str(BIN / "fairseq-train"), *map(str, args), "--user-dir", str(REPO / "fairseq_plugin"), "--cpu", "--max-tokens", "1000"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(
    "task_args",
    [
        ["--task", "masked_lm", "--arch", "clustered_transformer"],
        ["--task", "sentence_prediction", "--criterion", "sentence_prediction", "--num-classes", "2",
         "--arch", "i_clustered_transformer"],
        ["--task", "speech_to_text", "--config-yaml", "config.yaml", "--arch", "i_clustered_s2t_transformer"],
    ],
)
def test_missing_data_directory_is_one_line(tmp_path, task_args):
    missing = tmp_path / "no-such-data"
    proc = _train(missing, *task_args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and str(missing) in last and "does not exist" in last, last


def test_traceback_available_on_request(tmp_path):
    proc = _train(tmp_path / "nope", "--task", "masked_lm", "--arch", "clustered_transformer",
                  env={"FAIRSEQ_PLUGIN_TRACEBACK": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_the_plugins_own_missing_input_is_its_own_one_line(tmp_path):
    """A missing --load-pretrained-encoder-from is reported in the plugin's words, not read as a path."""
    data = make_speech_data(tmp_path / "speech", sizes={"train": 2, "valid": 2}).root
    missing = tmp_path / "encoder.pt"
    proc = _train(data, "--task", "speech_to_text", "--config-yaml", "config.yaml", "--arch", "clustered_s2t_transformer",
                  "--train-subset", "train", "--valid-subset", "valid", "--load-pretrained-encoder-from", missing)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fairseq-train: error: --load-pretrained-encoder-from {missing}: no such checkpoint"), last
    assert "does not exist" not in last, last
