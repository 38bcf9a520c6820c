#!/usr/bin/env bash
# Create (or update) .venv with torch, fairseq and this package. Idempotent: a second run with
# nothing to do takes a few seconds. Usage: bash scripts/setup.sh [--quiet]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*" >&2; }

"$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
    || { log "Python >= 3.11 is required (found $("$PY" --version)); set PYTHON=/path/to/python3.11"; exit 1; }

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$PWD/requirements/constraints.txt"

stamp="$VENV/.setup-stamp"
want=$(cat setup.py requirements/*.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import fairseq_plugin' 2>/dev/null; then
    log "$VENV is up to date"
    exit 0
fi

# torch first, pinned: anything that later asks for "torch" is then already satisfied.
log "installing torch (pinned in requirements/constraints.txt)"
"${pip[@]}" install torch==2.13.0
log "installing fairseq (ve-fairseq 0.12.3, hash-pinned, without its torchaudio requirement)"
"${pip[@]}" install --no-deps --no-warn-conflicts --require-hashes -r requirements/fairseq.txt
log "installing fairseq-clustered-attention and its pinned dependencies"
# --no-warn-conflicts: pip would report ve-fairseq's unmet torchaudio requirement, which is
# deliberate (see requirements/fairseq.txt); a real conflict still fails the install.
"${pip[@]}" install --no-warn-conflicts -e '.[test]'
log "installing the experiments' pinned packages (requirements/experiments*.txt)"
"${pip[@]}" install --no-warn-conflicts -r requirements/experiments.txt
"${pip[@]}" install --no-deps --no-warn-conflicts -r requirements/experiments-nodeps.txt
echo "$want" > "$stamp"
log "done: $("$VENV/bin/python" -c 'import torch, fairseq; print("torch", torch.__version__, "| fairseq", fairseq.__version__)' 2>/dev/null)"
