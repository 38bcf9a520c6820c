"""``python -m fairseq_plugin.ops``: which implementation serves each device and dtype, and why.

What a user asks when a run is slower than expected: the versions that decide it, the csrc/
extension's state, the variables that switch paths, then one row per device (the CPU and every
visible GPU, with its compute capability) giving :func:`fairseq_plugin.ops.implementation` for
float32, float16 and bfloat16 tensors there. The warnings that the dispatcher gives once (Triton
too old, a GPU below compute capability 8.0, the extension not loading) are printed as "why"
lines. Exits 0; it starts CUDA on each GPU to make its one-element tensors, and trains nothing.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from typing import List

import torch

from . import backend, compiled

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SWITCHES = ("FAIRSEQ_PLUGIN_COMPILED", "TRITON_INTERPRET", "FAIRSEQ_PLUGIN_TRITON_ON_CPU")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as err:  # not installed, or broken: say which
        return f"not importable ({type(err).__name__})"


def _probe(device: str, dtype: torch.dtype) -> torch.Tensor:
    """The one-element tensor that the dispatcher is asked about."""
    return torch.zeros(1, dtype=dtype, device=device)


def report() -> List[str]:
    """The report's lines (also printed by ``main``)."""
    version, new_enough = backend.triton_status()
    triton = f"{version} ({'>=' if new_enough else 'below'} {'.'.join(map(str, backend.MIN_TRITON))})"
    lines = [
        f"python {platform.python_version()} | torch {torch.__version__} (cuda {torch.version.cuda}) | "
        f"triton {triton} | numpy {_version('numpy')}",
        "csrc/ extension: " + ("loaded" if compiled.load() else f"not loaded: {compiled.load_error()}")
        + ("" if compiled.enabled() else " (FAIRSEQ_PLUGIN_COMPILED=0: the reference on purpose)"),
        "switches: " + "  ".join(f"{name}={os.environ.get(name, '<unset>')}" for name in SWITCHES),
    ]
    devices = [("cpu", f"{platform.machine()}, {torch.get_num_threads()} threads", "-")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            (major, minor), name = backend._capability(torch.device("cuda", index))
            devices.append((f"cuda:{index}", name, f"sm_{major}{minor}"))
    rows, why = [], []
    for device, name, capability in devices:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths = [backend.implementation(_probe(device, dtype)) for dtype in DTYPES]
        why += [f"why ({device}): {w.message}" for w in caught if issubclass(w.category, RuntimeWarning)]
        rows.append((device, name, capability, *paths))
    header = ("device", "name", "arch", *(str(dtype).replace("torch.", "") for dtype in DTYPES))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    if why:
        lines += ["", *why]
    lines += ["", "triton = the GPU kernels (on the CPU: Triton's interpreter, for tests); cpu = csrc/'s C++ kernels;",
              "reference = the PyTorch reference (correct; slow at long lengths). docs/ops-api.md, docs/gpu.md."]
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
