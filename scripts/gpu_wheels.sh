#!/usr/bin/env bash
# Wheels for the GPU machines, which reach no package index: fairseq and what its image lacks, for
# Python 3.12 on manylinux x86_64 (the device tool's KINDS.md: torch 2.11, numpy 2.5, sacrebleu,
# regex, tqdm, cython, scikit-learn, sentencepiece and tensorboard are there already).
#
#   bash scripts/gpu_wheels.sh [DIR]      # DIR defaults to .whl (git-ignored); about 22 MB
#
# Then carry DIR with the device call; scripts/gpu_check.sh installs it into a scratch folder for its
# fairseq_amp step (tests/fairseq/gpu_train.py). Versions: ve-fairseq hash-pinned as
# requirements/fairseq.txt pins it, the rest as requirements/constraints.txt pins them;
# antlr4-python3-runtime 4.9.3 (omegaconf 2.3's) has no wheel on the index, so it is built here
# (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$DIR"
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
pin() {  # NAME -> NAME==VERSION from requirements/constraints.txt
    local line
    line=$(grep -i "^$1==" requirements/constraints.txt) || { echo "error: $1 is not pinned in requirements/constraints.txt" >&2; exit 2; }
    echo "$line"
}
export PIP_CONSTRAINT=  # the target is another Python: the local constraints do not apply
"$PY" -m pip download -q --no-deps "${platform[@]}" --require-hashes -r requirements/fairseq.txt -d "$DIR"
# resolved first: an assignment whose command substitution fails stops the script (set -e); one
# used as an argument would only hand pip an empty requirement
pins=()
for name in hydra-core omegaconf bitarray editdistance; do
    line=$(pin "$name")
    pins+=("$line")
done
"$PY" -m pip download -q --no-deps "${platform[@]}" -d "$DIR" "${pins[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
ls -1 "$DIR"
du -sh "$DIR"
