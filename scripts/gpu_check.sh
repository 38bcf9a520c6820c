#!/usr/bin/env bash
# The GPU acceptance check (issue 10, deliverable 5), for the day a GPU is lent:
#
#   bash scripts/gpu_check.sh OUTDIR        # from the repository root; OUTDIR defaults to $OUT
#   PYTHON=/path/to/python bash scripts/gpu_check.sh OUTDIR   # another interpreter than `python3`
#
#   # on the lent machine, in one call with timeout_s=600 (the device tool brings back at most 8
#   # files from $OUT, so the ~20 logs travel as one archive, refreshed after every step):
#   BUDGET_S=540 ARCHIVE=$OUT/gpu_check.tar.gz bash scripts/gpu_check.sh /tmp/gpu_check
#
# `python3` first: the GPU machines' image has torch under python3 and may have no `python`.
# BUDGET_S (optional): seconds for the whole run; each step's limit shrinks to what is left, and a
# step with under 15 s left is recorded as SKIPPED, so that the run ends (and is archived) before
# the caller's own time limit. ARCHIVE (optional): a .tar.gz of OUTDIR, rewritten after each step.
# ONLY (optional): the steps to run, by name (e.g. ONLY="benchmark_targets benchmark_skew" for a
# rerun of what a first call did not finish); the others are left out of the summary.
#
# Needs torch + triton + CUDA and this repository; no network; fairseq only for fairseq_amp.
# Runs, in order: the environment, the kernel tests on CUDA, a CUDA-graph capture of i-clustered
# fwd+bwd (replayed and compared), torch.cuda.set_sync_debug_mode("error"), the NaN-row check in its
# own process, the centroid top-k's two paths (same outputs; each timed), compute-sanitizer memcheck/racecheck on tiny
# calls (where installed), the attention benchmark at issue 10's target shape (bf16, H=8, 1k-32k,
# against SDPA flash and cuDNN), one cluster holding half the queries at 16k, fairseq training with
# --fp16 / --bf16 / --memory-efficient-fp16 (its wheels from WHEELS, default .whl, made by
# scripts/gpu_wheels.sh), then the full CUDA benchmark grid with the time left.
# Every step runs even if an earlier one failed; each writes OUTDIR/<step>.log, and
# OUTDIR/summary.txt lists PASS/FAIL/SKIPPED per step. Exit status 1 if any step failed or was
# skipped for BUDGET_S, 2 on a bad BUDGET_S, ARCHIVE or ONLY.

set -u
OUTDIR=${1:-${OUT:?give the output folder as \$1 or \$OUT}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FAIRSEQ_PLUGIN_TRITON_ON_CPU
BUDGET_S=${BUDGET_S:-}
ARCHIVE=${ARCHIVE:-}
ONLY=${ONLY:-}
WHEELS=${WHEELS:-.whl}
# every step below, by name, in order (ONLY is checked against it)
STEPS="environment kernel_tests cuda_graph sync_debug nan_rows topk_paths sanitizer_memcheck sanitizer_racecheck"
STEPS="$STEPS benchmark_targets benchmark_skew fairseq_amp benchmark"
# wanted NAME: whether ONLY (if set) names step NAME
wanted() {
    [ -z "$ONLY" ] && return 0
    case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}
for name in $ONLY; do
    case " $STEPS " in
        *" $name "*) ;;
        *) echo "error: ONLY names an unknown step '$name'; the steps: $STEPS" >&2; exit 2 ;;
    esac
done
if [ -n "$BUDGET_S" ] && ! [ "$BUDGET_S" -gt 0 ] 2>/dev/null; then
    echo "error: BUDGET_S must be a positive number of seconds, got '$BUDGET_S'" >&2
    exit 2
fi
if [ -n "$ARCHIVE" ]; then
    mkdir -p "$(dirname "$ARCHIVE")" && ARCHIVE=$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")
    case "$ARCHIVE/" in
        "$OUTDIR"/*) echo "error: ARCHIVE ($ARCHIVE) must lie outside OUTDIR ($OUTDIR)" >&2; exit 2 ;;
    esac
fi
: > "$OUTDIR/summary.txt"
failed=0

# archive: OUTDIR as ARCHIVE (written aside, then moved, so a kill mid-write leaves the last one).
archive() {
    [ -n "$ARCHIVE" ] || return 0
    tar -czf "$ARCHIVE.tmp" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}

# step NAME SECONDS COMMAND...: run with a time limit (cut to BUDGET_S's remainder), log to
# OUTDIR/NAME.log, record PASS/FAIL/SKIPPED, refresh ARCHIVE.
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    wanted "$name" || return 0
    if [ -n "$BUDGET_S" ]; then
        local left=$((BUDGET_S - SECONDS - 25))  # 20 s for timeout's --kill-after, 5 s to archive
        if [ "$left" -lt 15 ]; then
            echo "$name: SKIPPED (BUDGET_S=$BUDGET_S spent)" | tee -a "$OUTDIR/summary.txt"
            failed=1  # a check that did not run has not passed
            return
        fi
        [ "$left" -ge "$limit" ] || limit=$left
    fi
    echo "== $name: $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    local rc=$?
    local verdict=PASS
    [ $rc -eq 0 ] || { verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s"))"; failed=1; }
    echo "$name: $verdict, $((SECONDS - start)) s" | tee -a "$OUTDIR/summary.txt"
    tail -n 3 "$OUTDIR/$name.log"
    archive
}

step environment 60 bash -c "nvidia-smi || echo nvidia-smi not found; git rev-parse HEAD || true; $PY -m fairseq_plugin.ops; $PY - <<'EOF'
import torch
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
    if wanted sanitizer_memcheck || wanted sanitizer_racecheck; then
        echo "sanitizer: SKIPPED (compute-sanitizer not found)" >> "$OUTDIR/summary.txt"
    fi
fi

# issue 10's targets first (bf16, N=1, H=8, E=64, C=100, k=32): break-even by 4k, 16k and 32k
step benchmark_targets 240 "$PY" experiments/benchmarks/attention.py --device cuda --dtype bfloat16 --heads 8 \
    --lengths 1024 4096 16384 32768 --impls sdpa sdpa-cudnn clustered i-clustered --out "$OUTDIR/attention-targets.csv"
# one cluster holding half the queries: the top-k attention's (cluster, 64-query) tiles should not care
step benchmark_skew 90 "$PY" experiments/benchmarks/attention.py --device cuda --dtype bfloat16 --heads 8 \
    --lengths 16384 --skew 0.5 --impls sdpa clustered i-clustered --out "$OUTDIR/attention-skew.csv"
# fairseq --fp16 / --bf16 / --memory-efficient-fp16 with every attention type, and an fp16 loss scale
# that overflows (issue 10, deliverable 4). The image has no fairseq: its wheels travel in WHEELS
# (scripts/gpu_wheels.sh; carry=[".whl"]), installed into a scratch folder for this step alone.
step fairseq_amp 240 env WHEELS="$WHEELS" PY="$PY" OUTDIR="$OUTDIR" bash -c '
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    trap "rm -rf $site" EXIT
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl \
            || { echo "FAIL: pip could not install the wheels of $WHEELS"; exit 1; }
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
    "$PY" tests/fairseq/gpu_train.py "$OUTDIR"'
step benchmark 300 "$PY" experiments/benchmarks/attention.py --device cuda --out "$OUTDIR/attention.csv"

echo "== summary ($OUTDIR${ARCHIVE:+, archived as $ARCHIVE})"
cat "$OUTDIR/summary.txt"
archive
exit $failed
