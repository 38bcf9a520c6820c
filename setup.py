"""Clustered, improved-clustered and hardmax attention for fairseq.

Install with ``bash scripts/setup.sh`` (creates ``.venv``): it installs torch first, fairseq
(``ve-fairseq==0.12.3``, hash-pinned, ``--no-deps``; see requirements/fairseq.txt) and then this
package, every version pinned by requirements/constraints.txt. This file states only the ranges
the package supports, so ``pip install --no-build-isolation -e .`` into an environment that already
has its own torch (a CUDA build, say) keeps that torch (the compiled ops build against it, so the
build must see it: hence no build isolation).

The compiled ops (csrc/) build as ``fairseq_plugin._C``: the C++ CPU kernels. The GPU kernels are
Triton (fairseq_plugin/ops/triton/), JIT-compiled at run time: nothing to build, no nvcc. A failed
build is a loud warning, not a failed install: the CPU ops then run on their PyTorch reference and
say so once at run time.
"""

import glob
import sys

from setuptools import find_packages, setup

# The oldest torch the code is written for: torch.library.custom_op / register_fake /
# register_autograd and weights_only loading with safe_globals are all older; 2.11 is what the GPU
# verification machines run (DESIGN.md §4). CI tests 2.13 (requirements/constraints.txt).
TORCH = "torch>=2.11"

# fairseq's real run-time dependencies (its wheel is installed with --no-deps because its
# metadata asks for torchaudio, which cannot load beside a CPU torch), then our own.
FAIRSEQ_DEPS = [
    "hydra-core>=1.3,<1.4",
    "omegaconf>=2.3,<2.4",
    "numpy>=1.24,<2",  # fairseq still uses np.float / np.int on a few paths (gone in numpy 2)
    "cffi>=1.15",
    "cython>=0.29",
    "regex>=2022.1",
    "sacrebleu>=2.0",
    "tqdm>=4.60",
    "bitarray>=2.0",
    "scikit-learn>=1.0",
    "packaging>=23",
    "sentencepiece>=0.1.99",
    "editdistance>=0.6",
]
# tensorboard >= 2.21: older releases import pkg_resources, which setuptools >= 81 no longer ships, so
# `tensorboard --logdir` does not start (tests/slurm/test_tensorboard.py)
OWN_DEPS = ["tensorboard>=2.21", "submitit>=1.5,<2", "matplotlib>=3.7"]


def extensions():
    """fairseq_plugin._C from csrc/: the C++ CPU kernels."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "error: setup.py needs torch to build the compiled ops; install torch first "
            "(bash scripts/setup.sh does) and use pip install --no-build-isolation -e ."
        )
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    ext = cpp_extension.CppExtension(
        "fairseq_plugin._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )
    ext.optional = True  # a failed build warns; the ops fall back to the reference and say why
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


EXT_MODULES, CMDCLASS = extensions()

setup(
    name="fairseq-clustered-attention",
    version="0.1.0",
    description="Clustered, improved-clustered and hardmax attention as a fairseq --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["fairseq_plugin", "fairseq_plugin.*", "slurm", "slurm.*"]),
    package_data={"slurm": ["py.typed"]},  # the launcher is typed (PEP 561); mypy checks it in the tests
    install_requires=[TORCH, *FAIRSEQ_DEPS, *OWN_DEPS],
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["fairseq-sweep = slurm.cli:main"]},
    # triton: the GPU kernels (a CUDA torch brings it); the tests run them in its interpreter.
    # mypy: tests/slurm/test_typing.py type-checks the launcher.
    # pytest-xdist: the README's test command runs the suite on two workers, a test file to each.
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "triton>=3.6", "mypy>=1.10"]},
)
