"""Clustered, improved-clustered and hardmax attention for fairseq.

Install with ``bash scripts/setup.sh`` (creates ``.venv``): it installs torch==2.13.0 first,
fairseq (``ve-fairseq==0.12.3``, hash-pinned, ``--no-deps``; see requirements/fairseq.txt) and
then this package with the pins below. ``pip install -e .`` alone works in an environment that
already has torch and fairseq.
"""

from setuptools import find_packages, setup

TORCH = "torch==2.13.0"

# fairseq's real run-time dependencies (its wheel is installed with --no-deps because its
# metadata asks for torchaudio, which cannot load beside a CPU torch), then our own.
FAIRSEQ_DEPS = [
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "numpy==1.26.4",  # fairseq still uses np.float / np.int on a few paths (gone in numpy 2)
    "cffi==2.0.0",
    "cython==3.3.1",
    "regex==2026.11.15",
    "sacrebleu==2.6.0",
    "tqdm==4.70.1",
    "bitarray==3.12.3",
    "scikit-learn==1.7.2",
    "packaging>=23",
    "sentencepiece==0.2.1",
    "editdistance==0.8.1",
]

setup(
    name="fairseq-clustered-attention",
    version="0.1.0",
    description="Clustered, improved-clustered and hardmax attention as a fairseq --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["fairseq_plugin", "fairseq_plugin.*", "slurm", "slurm.*"]),
    install_requires=[TORCH, *FAIRSEQ_DEPS, "tensorboard==2.20.0", "submitit==1.5.4", "matplotlib==3.11.2"],
    entry_points={"console_scripts": ["fairseq-sweep = slurm.cli:main"]},
    extras_require={"test": ["pytest==8.4.2"]},
)
