"""Checkpoints load with weights_only=True and an allowlist; a file that would run code is refused.

A crafted checkpoint (a real one with an object whose ``__reduce__`` creates a file) must be
refused by every way a checkpoint is loaded here, in one line naming the type and the trust
switch, and the file must not appear. Real checkpoints, an old-style one (``args`` Namespace) and
``--model-overrides`` still load. The allowlist itself is checked against real checkpoints of every
architecture in test_text_models.py / test_speech_models.py (they train them anyway).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_plugin import checkpoints

from .data import masked_lm_data
from .speech_data import make_speech_data
from .test_text_models import COMMON, ENV, REPO, TINY, run_tool, train

TRUST = checkpoints.TRUST_ENV


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears if the loader runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_refused(output: str, marker: Path, checkpoint: Path) -> None:
    assert not marker.exists(), "the crafted checkpoint ran code"
    lines = [line for line in output.splitlines() if "refusing to load checkpoint" in line]
    assert len(lines) == 1, output[-3000:]
    line = lines[0]
    assert str(checkpoint) in line and "io.open" in line and f"{TRUST}=" in line, line
    assert "Traceback" not in output, output[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return masked_lm_data(tmp_path_factory.mktemp("safety-data"))


@pytest.fixture(scope="module")
def real(data, tmp_path_factory) -> Path:
    """A real 2-update softmax_transformer checkpoint."""
    save = tmp_path_factory.mktemp("safety-run") / "ckpt"
    train(data, save, "--task", "masked_lm", "--criterion", "masked_lm", "--arch", "softmax_transformer", *TINY,
          "--tokens-per-sample", "128", "--max-update", "2")  # fmt: skip
    return save / "checkpoint_last.pt"


@pytest.fixture
def crafted(real, tmp_path):
    """(checkpoint, marker): the real checkpoint with a code-running object in its extra_state."""
    marker = tmp_path / "pwned"
    state = checkpoints.load(real)
    state["extra_state"]["note"] = _CreatesFile(marker)
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    assert not marker.exists()
    return path, marker


def test_fairseq_train_restore_file_refuses(crafted, data, tmp_path):
    path, marker = crafted
    proc = run_tool("fairseq-train", data, *COMMON, "--task", "masked_lm", "--criterion", "masked_lm",
                    "--arch", "softmax_transformer", *TINY, "--tokens-per-sample", "128", "--max-update", "3",
                    "--restore-file", path, "--save-dir", tmp_path / "save")  # fmt: skip
    assert proc.returncode != 0
    assert_refused(proc.stdout + proc.stderr, marker, path)


def test_fairseq_validate_refuses(crafted, data):
    path, marker = crafted
    proc = run_tool("fairseq-validate", data, "--user-dir", REPO / "fairseq_plugin", "--task", "masked_lm",
                    "--path", path, "--cpu", "--batch-size", "8")  # fmt: skip
    assert proc.returncode != 0
    assert_refused(proc.stdout + proc.stderr, marker, path)


def test_decode_ctc_refuses(crafted, tmp_path):
    path, marker = crafted
    speech = make_speech_data(tmp_path / "speech", sizes={"valid": 2})
    proc = subprocess.run([sys.executable, "experiments/speech/decode_ctc.py", str(path), "--data", str(speech.root)],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert_refused(proc.stdout + proc.stderr, marker, path)


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env or ENV, cwd=REPO,
                          timeout=120)  # fmt: skip


def test_load_model_ensemble_refuses_in_one_line(crafted):
    path, marker = crafted
    proc = _python(
        "import fairseq_plugin\nfrom fairseq import checkpoint_utils\nfairseq_plugin.register()\n"
        "from fairseq_plugin.checkpoints import UntrustedCheckpointError\n"
        f"try:\n    checkpoint_utils.load_model_ensemble([{str(path)!r}])\n"
        "except UntrustedCheckpointError as err:\n    print(err)\nelse:\n    print('LOADED')\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_refused(proc.stdout, marker, path)


@pytest.mark.parametrize("imports", ["import fairseq_plugin.ops", "import fairseq, fairseq_plugin"])
def test_plain_torch_load_still_refuses(crafted, imports):
    path, marker = crafted
    proc = _python(f"{imports}\nimport torch\ntorch.load({str(path)!r})\n")
    # torch's own refusal (it stops at the first type outside its allowlist)
    assert proc.returncode != 0 and "Weights only load failed" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()


def test_trusting_a_checkpoint_on_purpose(real, tmp_path):
    """A harmless type outside the allowlist: refused by default, loaded when the user names the file."""
    state = checkpoints.load(real)
    state["extra_state"]["written"] = datetime.date(2026, 12, 1)
    path = tmp_path / "older.pt"
    torch.save(state, path)
    code = (
        "import fairseq_plugin\nfrom fairseq import checkpoint_utils\nfairseq_plugin.register()\n"
        f"models, cfg = checkpoint_utils.load_model_ensemble([{str(path)!r}])\nprint('LOADED', type(models[0]).__name__)\n"
    )
    refused = _python(code)
    assert refused.returncode != 0 and "datetime.date" in refused.stderr and TRUST in refused.stderr
    trusted = _python(code, env={**ENV, TRUST: f"{tmp_path / 'other.pt'}{os.pathsep}{path}"})
    assert trusted.returncode == 0 and "LOADED EfficientRobertaModel" in trusted.stdout, trusted.stderr[-3000:]
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_old_style_checkpoint_with_args_namespace_loads(real, data, tmp_path):
    """fairseq's pre-hydra format: ``args`` (argparse.Namespace) and no ``cfg``."""
    state = checkpoints.load(real)
    args = state.pop("cfg")["model"]
    assert isinstance(args, argparse.Namespace)
    args.task, args.criterion, args.data = "masked_lm", "masked_lm", str(data)
    state["args"] = args
    path = tmp_path / "old.pt"
    torch.save(state, path)
    proc = run_tool("fairseq-validate", data, "--user-dir", REPO / "fairseq_plugin", "--task", "masked_lm",
                    "--path", path, "--cpu", "--batch-size", "8", "--required-batch-size-multiple", "1",
                    "--model-overrides", "{'attention_type': 'clustered', 'clusters': 4}")  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "attention_type='clustered'" in output and "valid on 'valid' subset" in output, output[-3000:]


def test_ops_import_has_no_side_effects():
    """import fairseq_plugin.ops: no fairseq, no environment change, no hook, no allowlist change."""
    proc = _python(
        "import os, sys, torch\n"
        "env, hook, safe = dict(os.environ), sys.excepthook, list(torch.serialization.get_safe_globals())\n"
        "sys.argv[0] = 'fairseq-train'\n"
        "import fairseq_plugin.ops\n"
        "assert 'fairseq' not in sys.modules, 'the ops imported fairseq'\n"
        "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
        "assert sys.excepthook is hook, 'the ops installed an excepthook'\n"
        "assert list(torch.serialization.get_safe_globals()) == safe\n"
        "print('CLEAN')\n",
        env={k: v for k, v in ENV.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"},
    )
    assert proc.returncode == 0 and "CLEAN" in proc.stdout, proc.stderr[-3000:]


def test_nothing_sets_the_process_wide_override():
    """No source file of the project sets torch's weights_only override."""
    offenders = []
    for path in [*REPO.glob("fairseq_plugin/**/*.py"), *REPO.glob("slurm/*.py"), *REPO.glob("experiments/**/*.py"),
                 *REPO.glob("scripts/*")]:  # fmt: skip
        if path.is_file() and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in path.read_text(errors="replace"):
            offenders.append(path.relative_to(REPO))
    # checkpoints.py names it only for a file the user trusts, inside one call (tested above).
    assert offenders == [Path("fairseq_plugin/checkpoints.py")], offenders
