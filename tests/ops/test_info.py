"""``python -m fairseq_plugin.ops``, the report of which implementation serves each device and dtype."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _report(**env: str) -> str:
    run = subprocess.run([sys.executable, "-m", "fairseq_plugin.ops"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=dict(os.environ, **env))
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _cpu_row(text: str) -> list:
    return next(line.split() for line in text.splitlines() if line.startswith("cpu "))[-3:]


@pytest.mark.parametrize(
    "env, row",
    [({}, ["cpu", "reference", "reference"]),  # csrc/ serves CPU float32 only among the three
     ({"FAIRSEQ_PLUGIN_COMPILED": "0"}, ["reference"] * 3),
     ({"TRITON_INTERPRET": "1", "FAIRSEQ_PLUGIN_TRITON_ON_CPU": "1"}, ["triton"] * 3)],
    ids=["default", "compiled-off", "interpreter"],
)
def test_report_names_the_cpu_implementations(env, row):
    pytest.importorskip("triton")
    from fairseq_plugin.ops import compiled

    if not env and not compiled.load():
        pytest.skip(f"the csrc/ extension is not built here: {compiled.load_error()}")
    clean = {name: "" for name in ("FAIRSEQ_PLUGIN_COMPILED", "TRITON_INTERPRET", "FAIRSEQ_PLUGIN_TRITON_ON_CPU")}
    text = _report(**{**clean, **env})
    assert "| triton " in text.splitlines()[0] and "csrc/ extension: " in text
    assert _cpu_row(text) == row, text


def test_report_lists_each_gpu_with_its_arch_and_why(monkeypatch):
    """Two fake GPUs (this machine may have none): an H100 takes the Triton kernels, a T4 the
    reference, and the dispatcher's warning for it is a "why" line."""
    from fairseq_plugin.ops import __main__ as info, backend

    gpus = [((9, 0), "NVIDIA H100 80GB HBM3"), ((7, 5), "Tesla T4")]

    class Probe:
        def __init__(self, device, dtype):
            self.device, self.dtype = torch.device(device), dtype
            self.is_floating_point, self.is_complex = (lambda: True), (lambda: False)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(backend, "_capability", lambda device: gpus[device.index])
    monkeypatch.setattr(backend, "_triton_version", ("3.9.0", True))
    monkeypatch.setattr(backend, "_gpu_ok", {})
    monkeypatch.setattr(info, "_probe", lambda device, dtype: Probe(device, dtype) if device != "cpu"
                        else torch.zeros(1, dtype=dtype))
    lines = info.report()
    rows = {line.split()[0]: line for line in lines if line.startswith(("cuda:", "cpu "))}
    assert rows["cuda:0"].split()[-4:] == ["sm_90", "triton", "triton", "triton"], lines
    assert rows["cuda:1"].split()[-4:] == ["sm_75", "reference", "reference", "reference"], lines
    why = [line for line in lines if line.startswith("why (cuda:1)")]
    assert len(why) == 1 and "compute capability >= 8.0" in why[0] and "Tesla T4 (sm_75)" in why[0], lines
    assert not any(line.startswith("why (cuda:0)") for line in lines)
