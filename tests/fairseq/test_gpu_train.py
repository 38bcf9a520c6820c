"""tests/fairseq/gpu_train.py, the fairseq step of the GPU acceptance run (scripts/gpu_check.sh
fairseq_amp), as a dry run on the CPU: the same data, commands and log parsing, in fp32 (fairseq's
--fp16 / --bf16 need CUDA). Two architectures, two at a time, about 25-35 s."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_train_dry_run_on_cpu(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fairseq" / "gpu_train.py"), str(tmp_path), "--device", "cpu",
         "--archs", "i_clustered_transformer", "hardmax_transformer", "--jobs", "2"],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "fairseq_gpu.json").read_text())
    assert sorted(results) == ["hardmax_transformer-fp32", "i_clustered_transformer-fp32"], results
    for name, result in results.items():
        assert result["rc"] == 0 and not result["problems"], (name, result)
        assert len(result["losses"]) >= 3 and all(math.isfinite(x) for x in result["losses"]), (name, result)
        assert (tmp_path / "fairseq" / f"{name}.log").read_text().startswith(sys.executable)
    assert "2 passed, 0 failed" in run.stdout
