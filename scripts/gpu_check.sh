#!/usr/bin/env bash
# The GPU acceptance check (issue 10, deliverable 5), for the day a GPU is lent:
#
#   bash scripts/gpu_check.sh OUTDIR        # from the repository root; OUTDIR defaults to $OUT
#   PYTHON=/path/to/python bash scripts/gpu_check.sh OUTDIR   # another interpreter than `python3`
#
# `python3` first: the GPU machines' image has torch under python3 and may have no `python`.
#
# Needs torch + triton + CUDA and this repository; no network, no fairseq. Runs, in order: the
# environment, the kernel tests on CUDA, a CUDA-graph capture of i-clustered fwd+bwd (replayed and
# compared), torch.cuda.set_sync_debug_mode("error"), the NaN-row check in its own process, the
# centroid top-k's two paths (same outputs; each timed), compute-sanitizer memcheck/racecheck on tiny
# calls (where installed), and the attention benchmark.
# Every step runs even if an earlier one failed; each writes OUTDIR/<step>.log, and
# OUTDIR/summary.txt lists PASS/FAIL per step. Exit status 1 if any step failed.

set -u
OUTDIR=${1:-${OUT:?give the output folder as \$1 or \$OUT}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FAIRSEQ_PLUGIN_TRITON_ON_CPU
: > "$OUTDIR/summary.txt"
failed=0

# step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record PASS/FAIL.
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    local rc=$?
    local verdict=PASS
    [ $rc -eq 0 ] || { verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s"))"; failed=1; }
    echo "$name: $verdict, $((SECONDS - start)) s" | tee -a "$OUTDIR/summary.txt"
    tail -n 3 "$OUTDIR/$name.log"
}

step environment 60 bash -c "nvidia-smi || echo nvidia-smi not found; git rev-parse HEAD || true; $PY - <<'EOF'
import platform, torch, triton
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| triton', triton.__version__)
print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
from fairseq_plugin.ops import implementation
x = torch.zeros(1, device='cuda', dtype=torch.bfloat16)
print('implementation(bf16 cuda tensor) =', implementation(x))
assert implementation(x) == 'triton'
EOF"

step kernel_tests 180 env FAIRSEQ_PLUGIN_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$OUTDIR/kernel_tests.xml" tests/ops/test_triton_clustering.py tests/ops/test_triton_attention.py

step cuda_graph 90 "$PY" tests/ops/gpu_checks.py graph "$OUTDIR"
step sync_debug 60 "$PY" tests/ops/gpu_checks.py sync "$OUTDIR"
step nan_rows 60 env CUDA_LAUNCH_BLOCKING=1 "$PY" tests/ops/gpu_checks.py nan "$OUTDIR"
step topk_paths 90 "$PY" tests/ops/gpu_checks.py topk "$OUTDIR"

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
    for tool in memcheck racecheck; do
        # no caching allocator, so an overrun leaves the allocation instead of landing in the pool
        step "sanitizer_$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
            --error-exitcode 1 "$PY" tests/ops/gpu_checks.py tiny "$OUTDIR"
    done
else
    echo "sanitizer: SKIPPED (compute-sanitizer not found)" | tee -a "$OUTDIR/summary.txt"
fi

step benchmark 300 "$PY" experiments/benchmarks/attention.py --device cuda --out "$OUTDIR/attention.csv"

echo "== summary ($OUTDIR)"
cat "$OUTDIR/summary.txt"
exit $failed
