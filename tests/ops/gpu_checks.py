"""GPU acceptance checks that are programs, not pytest tests (scripts/gpu_check.sh runs them).

    python tests/ops/gpu_checks.py graph OUT   # CUDA-graph capture of i-clustered fwd+bwd, replayed, compared
    python tests/ops/gpu_checks.py sync  OUT   # torch.cuda.set_sync_debug_mode("error") over fwd+bwd
    python tests/ops/gpu_checks.py nan   OUT   # NaN / inf inputs come out as NaN (run it in its own process)
    python tests/ops/gpu_checks.py tiny  OUT   # every op once on tiny shapes (under compute-sanitizer)
    python tests/ops/gpu_checks.py topk  OUT   # the centroid top-k's two paths: same outputs, each timed

Each prints one PASS/FAIL line per check, writes ``OUT/<check>.json`` and exits 1 on a failure.
Needs CUDA and triton; no fairseq. The name does not match ``test_*.py``, so pytest on a CPU
machine never collects it. ``GPU_CHECKS_DEVICE=cpu`` with ``TRITON_INTERPRET=1
FAIRSEQ_PLUGIN_TRITON_ON_CPU=1`` runs ``nan``, ``tiny`` and ``topk`` in Triton's interpreter, at
smaller sizes and under tests/ops/hostile.py (tests/ops/test_gpu_checks.py runs ``nan`` and
``topk``: the checks' own logic, before a GPU day depends on it).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fairseq_plugin.ops import (  # noqa: E402
    clustered_attention,
    implementation,
    improved_clustered_attention,
)

DEV = os.environ.get("GPU_CHECKS_DEVICE", "cuda")


def _qkv(n, h, length, e, dtype, seed=0, requires_grad=True):
    g = torch.Generator(DEV).manual_seed(seed)
    return tuple(
        torch.randn(n, h, length, e, generator=g, device=DEV, dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    )


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _fwd_bwd(fn: Callable, q, k, v, grad_out):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


def _capture(fn: Callable, static: tuple):
    """Warm up on a side stream, then capture fn(*static) in a CUDA graph; (graph, static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles the Triton kernels before capture
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)
    return graph, outputs


def check_graph() -> Dict[str, object]:
    """i-clustered fwd+bwd in a CUDA graph (any host sync or legacy-stream launch fails the capture).
    With topk = S it equals full attention whatever the clustering, so the replay, on fresh inputs
    copied into the static buffers, is compared with SDPA; with topk < S its error against full
    attention must be that of an eager call."""
    result = {}
    for name, length, topk in (("topk=S", 256, 256), ("topk<S", 2048, 32)):
        q, k, v = _qkv(1, 8, length, 64, torch.bfloat16, seed=1)
        grad_out = torch.randn_like(q)
        attn = lambda q, k, v: improved_clustered_attention(q, k, v, clusters=16, topk=topk)  # noqa: E731
        graph, static_out = _capture(lambda *a: _fwd_bwd(attn, *a), (q, k, v, grad_out))
        fresh_q, fresh_k, fresh_v = _qkv(1, 8, length, 64, torch.bfloat16, seed=2, requires_grad=False)
        with torch.no_grad():
            q.copy_(fresh_q), k.copy_(fresh_k), v.copy_(fresh_v)
        graph.replay()
        torch.cuda.synchronize()
        full = _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, grad_out)
        errors = [_rel(a, b) for a, b in zip(static_out, full)]
        if name == "topk=S":
            assert max(errors) < 2e-2, f"{name}: graph replay differs from full attention: {errors}"
        else:
            eager = _fwd_bwd(attn, q, k, v, grad_out)
            eager_errors = [_rel(a, b) for a, b in zip(eager, full)]
            assert all(torch.isfinite(t).all() for t in static_out), f"{name}: non-finite replay output"
            assert errors[0] < 1.5 * eager_errors[0] + 1e-2, f"{name}: replay error {errors} vs eager {eager_errors}"
            result[f"{name} eager_rel_err"] = eager_errors
        graph.replay()  # twice: the buffers are reused, nothing accumulates
        torch.cuda.synchronize()
        result[f"{name} rel_err out,dq,dk,dv"] = errors
    return result


def check_sync() -> Dict[str, object]:
    """No host synchronisation anywhere in clustered / i-clustered fwd+bwd (after a warm-up call)."""
    q, k, v = _qkv(2, 4, 1000, 64, torch.float16, seed=3)
    pad = torch.zeros(2, 1000, dtype=torch.bool, device=DEV)
    pad[1, 900:] = True
    grad_out = torch.randn_like(q)
    calls = {
        "clustered": lambda q, k, v: clustered_attention(q, k, v, clusters=50, key_padding_mask=pad,
                                                         query_padding_mask=pad),
        "i-clustered": lambda q, k, v: improved_clustered_attention(q, k, v, clusters=50, topk=32,
                                                                    key_padding_mask=pad, query_padding_mask=pad),
    }
    for name, fn in calls.items():
        _fwd_bwd(fn, q, k, v, grad_out)  # warm-up: compiles, loads
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _fwd_bwd(fn, q, k, v, grad_out)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return {"implementation": implementation(q), "checked": list(calls)}


def check_nan() -> Dict[str, object]:
    """A NaN query poisons exactly its cluster; an inf key poisons every query that attends to it;
    no out-of-range index (an illegal address would kill this process: run it alone)."""
    # the interpreter runs a program at a time, and a centroid row's top-k sort takes ~0.6 s there
    length, c = (512, 20) if DEV == "cuda" else (64, 6)
    q, k, v = _qkv(1, 2, length, 64, torch.bfloat16, seed=4, requires_grad=False)
    q[0, 0, 7, 3] = float("nan")
    out, info = improved_clustered_attention(q, k, v, clusters=c, topk=32, return_clusters=True)
    _sync()
    cluster = info.assignment[0, 0] == info.assignment[0, 0, 7]
    assert torch.isnan(out[0, 0, 7]).all(), "the NaN query's output is not NaN"
    assert torch.isnan(out[0, 0][cluster]).all(), "a query of the NaN query's cluster is not NaN"
    assert torch.isfinite(out[0, 0][~cluster]).all() and torch.isfinite(out[0, 1]).all(), "NaN leaked"
    q[0, 0, 7, 3] = 0.0
    k[0, 1, 100 % length, 0] = float("inf")
    out = clustered_attention(q, k, v, clusters=c)
    out_i = improved_clustered_attention(q, k, v, clusters=c, topk=32)
    _sync()
    for name, o in (("clustered", out), ("i-clustered", out_i)):
        assert torch.isfinite(o[0, 0]).all(), f"{name}: head without inf is not finite"
        assert torch.isnan(o[0, 1]).any(), f"{name}: an inf key came out as silent numbers"
    return {"cluster_size_of_nan_query": int(cluster.sum())}


def check_tiny() -> Dict[str, object]:
    """Every op once, fwd+bwd, on tiny padded shapes: for compute-sanitizer memcheck/racecheck."""
    for dtype in (torch.float16, torch.float32):
        q, k, v = _qkv(2, 2, 37, 16, dtype, seed=5)
        pad = torch.zeros(2, 37, dtype=torch.bool, device=DEV)
        pad[0, 30:] = True
        for fn in (
            lambda: clustered_attention(q, k, v, clusters=5, key_padding_mask=pad, query_padding_mask=pad),
            lambda: improved_clustered_attention(q, k, v, clusters=5, topk=8, key_padding_mask=pad,
                                                 query_padding_mask=pad),
            lambda: improved_clustered_attention(q[:, :, :1], k, v, clusters=5, topk=64),  # one query, k > S
        ):
            out = fn()
            out.float().square().sum().backward()
    _sync()
    return {"dtypes": ["float16", "float32"]}


def check_topk() -> Dict[str, object]:
    """The centroid softmax + top-k's two ways of choosing the top-k (fairseq_plugin/ops/triton/topk.py)
    on centroid scores of random queries and keys, i-clustered's default shape (C = 100, k = 32, E = 64):
    the threshold's candidates and the chunk merge must give identical outputs; the share of rows
    on the threshold's path and the milliseconds of each (median of 20 calls) are recorded."""
    from fairseq_plugin.ops.triton import topk

    # heads, clusters, lengths, timed calls: the interpreter runs a program at a time
    h, c, lengths, repeats = (8, 100, (4096, 16384), 20) if DEV == "cuda" else (1, 2, (200,), 0)
    result = {}
    for length in lengths:
        for kind in ("iid", "low-rank keys"):
            g = torch.Generator(DEV).manual_seed(length)
            keys = torch.randn(1, h, length, 64, generator=g, device=DEV)
            if kind == "low-rank keys":  # keys near an 8-dimensional subspace: peaked, correlated rows
                basis = torch.randn(1, h, 8, 64, generator=g, device=DEV)
                keys = torch.randn(1, h, length, 8, generator=g, device=DEV) @ basis + 0.1 * keys
            centroids = 0.5 * torch.randn(1, h, c, 64, generator=g, device=DEV)
            scores = (centroids @ keys.transpose(-1, -2) * 0.125).contiguous()
            kpm = torch.zeros(1, length, dtype=torch.int8, device=DEV)
            runs = {}
            for threshold in (True, False):
                *outs, path = topk._launch(scores, kpm, 32, threshold=threshold)
                times = []
                for _ in range(repeats):  # none in the interpreter
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    topk._launch(scores, kpm, 32, threshold=threshold)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                runs[threshold] = (outs, path, statistics.median(times) if times else None)
            (fast, path, fast_ms), (merge, merge_path, merge_ms) = runs[True], runs[False]
            assert int(merge_path.sum()) == 0, "threshold=False still took the threshold's path"
            for name, a, b in zip(("rest_weights", "top", "top_weights", "mass"), fast, merge):
                assert torch.equal(a, b), f"L={length} {kind}: {name} differs between the two paths"
            result[f"L={length} {kind}"] = {"threshold_rows": float(path.float().mean()),
                                            "threshold_ms": fast_ms, "merge_ms": merge_ms}
            print(f"L={length:>6} {kind:>13}: {float(path.float().mean()):.0%} of rows on the threshold's path; "
                  f"threshold {fast_ms} ms, merge {merge_ms} ms", flush=True)
    return result


CHECKS = {"graph": check_graph, "sync": check_sync, "nan": check_nan, "tiny": check_tiny, "topk": check_topk}
CPU_CHECKS = ("nan", "tiny", "topk")  # the ones that also run in Triton's interpreter (GPU_CHECKS_DEVICE=cpu)


def main(argv) -> int:
    if len(argv) != 2 or argv[0] not in CHECKS:
        print(f"usage: gpu_checks.py {{{','.join(CHECKS)}}} OUT", file=sys.stderr)
        return 2
    name, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if DEV == "cuda" and not torch.cuda.is_available():
        print(f"FAIL {name}: CUDA is not available")
        return 1
    if DEV != "cuda" and (name not in CPU_CHECKS or implementation(torch.zeros(1)) != "triton"):
        print(f"FAIL {name}: GPU_CHECKS_DEVICE={DEV} runs {', '.join(CPU_CHECKS)} in Triton's interpreter only "
              "(TRITON_INTERPRET=1 FAIRSEQ_PLUGIN_TRITON_ON_CPU=1)")
        return 1
    if DEV != "cuda":  # the GPU hazards the interpreter hides made to fail (hostile.py)
        from tests.ops import hostile

        hostile.install()
    device = torch.cuda.get_device_name() if DEV == "cuda" else f"{DEV} (Triton's interpreter)"
    record = {"check": name, "device": device, "torch": torch.__version__}
    try:
        record.update(CHECKS[name]())
        record["status"] = "PASS"
    except Exception as err:
        record["status"] = "FAIL"
        record["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"{record['status']} {name}" + (f": {record.get('error')}" if record["status"] == "FAIL" else ""))
    return 0 if record["status"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
