#!/usr/bin/env bash
# The whole speech experiment (docs/results.md section 1), from the repository root:
#   bash experiments/speech/run.sh [OVERRIDES ...]      # e.g. budget.wall_minutes=5 name=speech-short
# 1. apt-installs espeak-ng, sox, pocketsphinx-testdata if missing (scripts/speech_deps.sh)
# 2. fairseq-sweep run: synthesises the corpus on first use (~2.5 min), then trains softmax_ctc,
#    clustered_ctc and i_clustered_ctc one after the other for budget.wall_minutes each (10 by default)
# 3. fairseq-sweep report: results.md and plots/metric_vs_time.png (valid CER against training time)
# 4. evaluate: test-set and real-clip (pocketsphinx-testdata) CER/WER, updates and s/update per run
# Everything lands in outputs/sweeps/<name>/. Rerunning skips finished runs and existing data.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
SWEEP=experiments/speech/sweep.yaml
bash scripts/speech_deps.sh
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
start=$(date +%s)
"$PY" -m slurm run "$SWEEP" "$@" || echo "[speech] some runs did not finish (listed above); reporting the rest"
"$PY" -m slurm report "$SWEEP" "$@"
"$PY" -m experiments.speech.evaluate "$SWEEP" "$@"
echo "[speech] done in $(( $(date +%s) - start )) s"
