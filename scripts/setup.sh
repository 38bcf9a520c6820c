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

# The compiled ops (csrc/ -> fairseq_plugin/_C*.so) are rebuilt whenever their sources change.
build_ops() {
    log "building the compiled ops (csrc/, CPU$("$VENV/bin/python" -c 'import torch; print(" + CUDA" if torch.version.cuda else "")'))"
    "$VENV/bin/python" setup.py -q build_ext --inplace >"$VENV/.build-ops.log" 2>&1 \
        || { tail -30 "$VENV/.build-ops.log" >&2; log "building csrc/ failed (log: $VENV/.build-ops.log)"; exit 1; }
    find csrc setup.py -type f | sort | xargs cat | sha256sum | cut -c1-16 > "$VENV/.ops-stamp"
}
ops_want=$(find csrc setup.py -type f | sort | xargs cat | sha256sum | cut -c1-16)

stamp="$VENV/.setup-stamp"
want=$(cat setup.py requirements/*.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import fairseq_plugin' 2>/dev/null; then
    if [ "$(cat "$VENV/.ops-stamp" 2>/dev/null)" != "$ops_want" ]; then build_ops; fi
    log "$VENV is up to date"
    exit 0
fi

# torch first, pinned: anything that later asks for "torch" is then already satisfied.
log "installing torch (the version: requirements/constraints.txt)"
"${pip[@]}" install torch
log "installing fairseq (ve-fairseq 0.12.3, hash-pinned, without its torchaudio requirement)"
"${pip[@]}" install --no-deps --no-warn-conflicts --require-hashes -r requirements/fairseq.txt
log "installing fairseq-clustered-attention and its pinned dependencies"
# --no-warn-conflicts: pip would report ve-fairseq's unmet torchaudio requirement, which is
# deliberate (see requirements/fairseq.txt); a real conflict still fails the install.
# ninja compiles the ops' sources in parallel; --no-build-isolation: they build against the
# torch installed above (an isolated build would fetch another torch to compile against).
"${pip[@]}" install ninja  # the version: requirements/constraints.txt
"${pip[@]}" install --no-warn-conflicts --no-build-isolation -e '.[test]'
# pip built the ops above, but a failed build is only a warning inside pip (the ops would fall
# back to the reference): check that they load, and rebuild here, loudly, if they do not.
if "$VENV/bin/python" -c 'import torch, importlib.util as u, sys; s = u.find_spec("fairseq_plugin._C"); sys.exit(s is None or torch.ops.load_library(s.origin))' 2>/dev/null; then
    find csrc setup.py -type f | sort | xargs cat | sha256sum | cut -c1-16 > "$VENV/.ops-stamp"
else
    build_ops
fi
log "installing the experiments' pinned packages (requirements/experiments*.txt)"
"${pip[@]}" install --no-warn-conflicts -r requirements/experiments.txt
"${pip[@]}" install --no-deps --no-warn-conflicts -r requirements/experiments-nodeps.txt
echo "$want" > "$stamp"
log "done: $("$VENV/bin/python" -c 'import torch, fairseq; print("torch", torch.__version__, "| fairseq", fairseq.__version__)' 2>/dev/null)"
