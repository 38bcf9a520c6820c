"""Which implementation serves a tensor: the Triton kernels, the csrc/ C++ CPU kernels, or the reference.

``implementation(t)`` is what the ops dispatch on, and what a user asks when a run is slow:

* ``"triton"``: triton >= 3.6 is importable and ``t`` is a CUDA tensor of dtype float16,
  bfloat16 or float32 (or an integer tensor, for codes and assignments) on a GPU of compute
  capability >= 8.0; or ``t`` is a CPU tensor
  and both ``TRITON_INTERPRET=1`` and ``FAIRSEQ_PLUGIN_TRITON_ON_CPU=1`` are set, so the kernels
  run in Triton's interpreter (how the tests check them without a GPU);
* ``"cpu"``: ``t`` is on the CPU and :func:`compiled.usable` accepts it (the csrc/ extension);
* ``"reference"``: everything else (the PyTorch reference of every op), and every tensor while
  :func:`compiled.use_compiled` is off (``FAIRSEQ_PLUGIN_COMPILED=0``).

A CUDA tensor with Triton missing or older than 3.6 warns once, naming the version, and runs the
reference. So does a CUDA tensor on a GPU below compute capability 8.0 (a T4 or a V100), once a
device, naming the GPU: there Triton makes no tensor-core tile products, the half-precision
backward needs more shared memory than the 64 KB a block may have, and the k-means pass spills
(experiments/benchmarks/compile_kernels.py; docs/gpu.md). So does the interpreter switch where triton's interpreter cannot run the kernels
(:func:`interpreter_problem`: triton 3.6 with numpy >= 2.4); CPU tensors then take csrc/ or the
reference. Triton is imported on the first question about a CUDA tensor (or under the
interpreter switch), never at package import, and the answer is cached. The environment is read
once too: set both variables before the first op runs (and before anything imports triton, since
triton decides at ``@triton.jit`` time whether a kernel is interpreted).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import compiled

MIN_TRITON = (3, 6)
MIN_CAPABILITY = (8, 0)  # Ampere: the oldest arch the kernels compile cleanly for (compile_kernels.ARCHES)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_triton_version: Optional[Tuple[str, bool]] = None  # (version or why missing, new enough)
_on_cpu: Optional[bool] = None
_interpreter_ok: Optional[bool] = None
_warned = False
_gpu_ok: Dict[Optional[int], bool] = {}  # CUDA device index -> compute capability >= MIN_CAPABILITY


def _parse(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def triton_status() -> Tuple[str, bool]:
    """(triton's version, or why it is missing; whether it is >= 3.6). Imports triton once."""
    global _triton_version
    if _triton_version is None:
        try:
            import triton

            version = str(getattr(triton, "__version__", "0"))
            _triton_version = (version, _parse(version) >= MIN_TRITON)
        except Exception as err:  # ImportError, or a broken install
            _triton_version = (f"not importable ({type(err).__name__}: {err})", False)
    return _triton_version


def triton_on_cpu() -> bool:
    """Whether CPU tensors take the Triton path (TRITON_INTERPRET=1 and FAIRSEQ_PLUGIN_TRITON_ON_CPU=1)."""
    global _on_cpu
    if _on_cpu is None:
        _on_cpu = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FAIRSEQ_PLUGIN_TRITON_ON_CPU") == "1"
    return _on_cpu


def interpreter_problem(triton_version: str, numpy_version: Optional[str]) -> Optional[str]:
    """Why triton's interpreter cannot run the kernels with these versions (one line naming the
    fix), or None. triton 3.6's interpreter converts loop bounds with ``int()`` of a one-element
    array, which numpy 2.4 turned into a TypeError ("only 0-dimensional arrays can be converted");
    triton 3.7 squeezes the array first. numpy ``None``: not importable (the interpreter needs it)."""
    if numpy_version is None:
        return "triton's interpreter needs numpy, which is not importable; pip install 'numpy<2.4'"
    if _parse(triton_version) == (3, 6) and _parse(numpy_version) >= (2, 4):
        return (
            f"triton {triton_version}'s interpreter fails on numpy {numpy_version} (int() of a one-element "
            "array, an error since numpy 2.4); pip install 'numpy<2.4', or triton >= 3.7"
        )
    return None


def _interpreter_usable() -> bool:
    """Whether the interpreter switch can send CPU tensors to the kernels; warns once if not."""
    global _interpreter_ok
    if _interpreter_ok is None:
        try:
            import numpy

            numpy_version: Optional[str] = str(numpy.__version__)
        except ImportError:
            numpy_version = None
        problem = interpreter_problem(triton_status()[0], numpy_version)
        _interpreter_ok = problem is None
        if problem:
            warnings.warn(
                f"fairseq_plugin: TRITON_INTERPRET=1 FAIRSEQ_PLUGIN_TRITON_ON_CPU=1 is set, but {problem}; "
                "CPU tensors run csrc/ or the reference instead",
                RuntimeWarning,
                stacklevel=3,
            )
    return _interpreter_ok


def _capability(device: torch.device) -> Tuple[Tuple[int, int], str]:
    """(compute capability, name) of a CUDA device. From ``get_device_properties``, which
    torch.compile folds to a constant when the first call is traced (get_device_capability and
    get_device_name it does not)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.name


def _gpu_supported(device: torch.device) -> bool:
    """Whether the Triton kernels serve this CUDA device; warns once a device when they do not."""
    ok = _gpu_ok.get(device.index)
    if ok is None:
        (major, minor), name = _capability(device)
        ok = _gpu_ok[device.index] = (major, minor) >= MIN_CAPABILITY
        if not ok:
            warnings.warn(
                f"fairseq_plugin: the Triton GPU kernels need compute capability >= "
                f"{'.'.join(map(str, MIN_CAPABILITY))} (Ampere or newer); {device} is a {name} "
                f"(sm_{major}{minor}), so CUDA tensors there run the PyTorch reference (correct but slow)",
                RuntimeWarning,
                stacklevel=3,
            )
    return ok


def _dtype_ok(t: Tensor) -> bool:
    return t.dtype in _TRITON_DTYPES or not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def implementation(t: Tensor) -> str:
    """``"triton"``, ``"cpu"`` (csrc/) or ``"reference"``: the implementation that serves ``t``."""
    global _warned
    if not compiled.enabled():  # FAIRSEQ_PLUGIN_COMPILED=0 / use_compiled(False): the reference, on purpose
        return "reference"
    if t.device.type == "cuda":
        version, ok = triton_status()
        if ok:
            return "triton" if _dtype_ok(t) and _gpu_supported(t.device) else "reference"
        if not _warned:
            _warned = True
            warnings.warn(
                f"fairseq_plugin: the Triton GPU kernels need triton >= {'.'.join(map(str, MIN_TRITON))}, "
                f"found triton {version}; CUDA tensors run the PyTorch reference (correct but slow)",
                RuntimeWarning,
                stacklevel=2,
            )
        return "reference"
    if t.device.type == "cpu":
        if triton_on_cpu() and _dtype_ok(t) and triton_status()[1] and _interpreter_usable():
            return "triton"
        if compiled.usable(t):
            return "cpu"
    return "reference"
