#!/usr/bin/env bash
# The whole hardmax experiment (docs/results.md section 3), from the repository root:
#   bash experiments/hardmax/run.sh [OVERRIDES ...]      # sweep overrides, e.g. seeds=[1] name=hardmax-short
# 1. dynamics.py: float64 hardmax dynamics, checks table and trajectory plots (~30 s)
# 2. fairseq-sweep run: Rotten Tomatoes data on first use (~15 s), then 3 arms x d in {2,4,8,16} x 3 seeds,
#    12 epochs each, 2 at a time (~25 min on 2 idle CPU cores; ~60 min when the cores are shared)
# 3. fairseq-sweep report (valid accuracy), evaluate.py (valid + test accuracy of the best checkpoints),
#    leaders.py (leader words of confident correct test sentences, d = 2 token plots)
# Everything lands in outputs/hardmax/dynamics and outputs/sweeps/<name>/. Reruns skip finished work.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
SWEEP=experiments/hardmax/sentiment.yaml
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
start=$(date +%s)
"$PY" -m experiments.hardmax.dynamics --out outputs/hardmax/dynamics
"$PY" -m slurm run "$SWEEP" "$@"
"$PY" -m slurm report "$SWEEP" "$@"
"$PY" -m experiments.hardmax.evaluate "$SWEEP" "$@"
"$PY" -m experiments.hardmax.leaders "$SWEEP" "$@"
echo "[hardmax] done in $(( $(date +%s) - start )) s"
