"""The launcher type-checks: ``python -m mypy slurm`` with the repository's mypy.ini (every function
annotated, generics parameterised) reports no error."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_mypy_finds_no_error_in_slurm():
    proc = subprocess.run([sys.executable, "-m", "mypy", "slurm"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout, proc.stdout
