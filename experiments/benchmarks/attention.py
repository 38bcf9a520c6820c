"""Benchmark: exact attention (SDPA) against clustered and improved-clustered attention.

A grid over sequence lengths and attention implementations, forward and forward+backward. For
each cell: median wall time over ``--repeats`` timed runs (after a warm-up), peak extra memory,
and the relative error of the output against exact attention (||out - exact||_F / ||exact||_F) on
two kinds of inputs: iid Gaussian queries/keys, and structured ones (queries and keys drawn around
a few hundred shared centres, so that attention is peaked as in trained models). It also reports
the time spent hashing and clustering (clust ms) next to the forward time, and per-stage times of
one profiled call (hash, kmeans, aggregate, centroid_topk, centroid_bwd, topk_fwd, topk_bwd,
combine: the compiled ops, from torch.profiler). ``--skew 0.5`` makes half of each head's queries one point, so that one
cluster holds them (the skewed-cluster case).

Implementations: ``sdpa`` (torch.nn.functional.scaled_dot_product_attention; the flash backend on
CUDA), ``sdpa-cudnn`` (its cuDNN backend, CUDA half precision), ``ref-clustered`` /
``ref-i-clustered`` (the PyTorch reference of fairseq_plugin.ops), ``clustered`` / ``i-clustered``
(the compiled kernels: csrc/ on the CPU, Triton on CUDA).

    python experiments/benchmarks/attention.py                      # CPU grid, N=1 H=4 E=64 C=100 B=63 I=10 k=32
    python experiments/benchmarks/attention.py --lengths 1024 8192 --threads 2
    python experiments/benchmarks/attention.py --lengths 1024 8192 --threads 2 --isa best avx2   # AVX-512 vs AVX2
    python experiments/benchmarks/attention.py --device cuda        # float32 H=4 and bfloat16 H=8 (SDPA flash, cuDNN), + 32k
    python experiments/benchmarks/attention.py --device cuda --dtype bfloat16 --heads 8 --skew 0.5   # one big cluster

On CPU every cell runs in fresh subprocesses: ``--processes`` (3) for time and error with the
default allocator, their timed runs pooled (glibc's allocator is fast in some processes and slow in
others, see csrc/README.md), and one for peak memory (growth of its peak RSS, with glibc's mmap
threshold pinned so freed tensors leave the RSS); on CUDA in-process, memory by
torch.cuda.max_memory_allocated. Results: a table on stdout and a CSV (``--out``); on CPU the isa
column says which variant each cell ran (the plugin's kernels / ATen's, e.g. ``avx2=avx2/avx2``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

IMPLS = ["sdpa", "ref-clustered", "ref-i-clustered", "clustered", "i-clustered"]
CUDA_IMPLS = ["sdpa-cudnn"]  # SDPA's cuDNN backend, a second baseline on CUDA (half precision)
# the ops of both compiled namespaces (csrc/ and Triton), by the stage of the pipeline they are
STAGES = {"lsh_hash": "hash", "hamming_kmeans": "kmeans", "cluster_sum": "aggregate", "cluster_broadcast": "aggregate",
          "softmax_topk": "centroid_topk", "centroid_attention": "centroid_topk", "centroid_topk": "centroid_topk",
          "centroid_attention_backward": "centroid_bwd", "softmax_topk_backward": "centroid_bwd", "topk_attention": "topk_fwd",
          "topk_attention_combine": "topk_fwd", "topk_attention_backward": "topk_bwd", "cluster_combine": "combine",
          "cluster_combine_backward": "combine"}  # fmt: skip
# --isa: the CPU instruction set a cell may use, for the plugin's kernels (FAIRSEQ_PLUGIN_CPU_ISA caps
# their run-time choice) and for PyTorch's own (ATen's kernels, MKL's GEMM, oneDNN), so that an AVX2
# machine is reproduced on an AVX-512 one, and both are compared side by side in one run.
ISA_ENV = {
    "best": {},
    "avx2": {"FAIRSEQ_PLUGIN_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "DNNL_MAX_CPU_ISA": "AVX2"},
    "default": {"FAIRSEQ_PLUGIN_CPU_ISA": "default", "ATEN_CPU_CAPABILITY": "default",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41"},
}  # fmt: skip
CSV_FIELDS = ["device", "dtype", "threads", "isa", "isa_ran", "n", "h", "length", "e", "clusters", "hash_bits", "iterations", "topk",
              "impl", "pass", "median_ms", "min_ms", "repeats", "processes", "process_medians_ms", "peak_mem_mb",
              "err_iid", "err_structured", "skew", "stages_ms",
              "clustering_ms", "speedup_vs_sdpa"]  # fmt: skip


@dataclass
class Cell:
    device: str
    dtype: str
    threads: int
    n: int
    h: int
    length: int
    e: int
    clusters: int
    hash_bits: int
    iterations: int
    topk: int
    impl: str
    passes: str  # "fwd" or "fwd+bwd"
    repeats: int
    processes: int = 1  # CPU: timing processes per cell (their timed runs are pooled)
    skew: float = 0.0  # this fraction of each head's queries are one query (+ noise): one big cluster
    isa: str = "best"  # CPU: a key of ISA_ENV
    results: Dict[str, float] = field(default_factory=dict)


def make_inputs(cell: Cell, structured: bool, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (cell.n, cell.h, cell.length, cell.e)
    if structured:  # queries and keys around 300 shared centres (per head), values iid
        centres = torch.randn(cell.n, cell.h, 300, cell.e, generator=g)
        pick_q = torch.randint(0, 300, shape[:3], generator=g)
        pick_k = torch.randint(0, 300, shape[:3], generator=g)
        gather = lambda pick: centres.gather(2, pick.unsqueeze(-1).expand(*shape))  # noqa: E731
        q = gather(pick_q) + 0.3 * torch.randn(shape, generator=g)
        k = gather(pick_k) + 0.3 * torch.randn(shape, generator=g)
    else:
        q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    if cell.skew > 0:  # a skewed clustering: the first skew * L queries of a head are near one point
        many = int(cell.skew * cell.length)
        q[:, :, :many] = q[:, :, :1] + 1e-3 * torch.randn(q[:, :, :many].shape, generator=g)
    dtype = getattr(torch, cell.dtype)
    return tuple(t.to(cell.device, dtype) for t in (q, k, v))


def attention_fn(cell: Cell) -> Callable:
    import torch
    import torch.nn.functional as F

    from fairseq_plugin.ops import clustered_attention, compiled, implementation, improved_clustered_attention

    kw = dict(clusters=cell.clusters, hash_bits=cell.hash_bits, iterations=cell.iterations)
    if cell.impl.startswith("sdpa"):
        if cell.device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            half = cell.dtype in ("float16", "bfloat16")
            if cell.impl == "sdpa-cudnn":
                backend = SDPBackend.CUDNN_ATTENTION
            else:
                backend = SDPBackend.FLASH_ATTENTION if half else SDPBackend.EFFICIENT_ATTENTION

            def sdpa(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)

            return sdpa
        return F.scaled_dot_product_attention
    use = not cell.impl.startswith("ref-")
    served = implementation(torch.empty(0, device=cell.device, dtype=getattr(torch, cell.dtype)))
    if use and served == "reference":
        raise SystemExit(f"no compiled kernel serves {cell.dtype} on {cell.device} (the csrc/ extension: "
                         f"{compiled.load_error() or 'loaded'}; the GPU needs triton >= 3.6)")  # fmt: skip
    fn = improved_clustered_attention if cell.impl.endswith("i-clustered") else clustered_attention
    extra = {"topk": cell.topk} if cell.impl.endswith("i-clustered") else {}

    def run(q, k, v):
        with compiled.use_compiled(use):
            return fn(q, k, v, **kw, **extra)

    return run


def clustering_fn(cell: Cell) -> Optional[Callable]:
    """Hashing + k-means alone (compiled path: the planes and the k-means seeds drawn, lsh_hash,
    hamming_kmeans), to report their share of the forward time; not the centroids' aggregation."""
    if cell.impl not in ("clustered", "i-clustered"):
        return None
    from fairseq_plugin.ops import hamming_kmeans, lsh_hash
    from fairseq_plugin.ops.hashing import draw_planes

    def run(q, k, v):
        codes = lsh_hash(q, draw_planes(cell.hash_bits, q.shape[-1], True, None, q.device))
        return hamming_kmeans(codes, cell.hash_bits, cell.clusters, cell.iterations)

    return run


def stage_times(step: Callable, device: str) -> str:
    """One call of ``step`` under torch.profiler: milliseconds per pipeline stage (the compiled ops of
    both namespaces, by :data:`STAGES`), as ``stage=ms;...``; the rest of the call is ``other``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    stages: Dict[str, float] = {}
    for event in prof.key_averages():
        namespace, _, op = event.key.partition("::")
        if namespace in ("fairseq_clustered", "fairseq_clustered_triton") and op in STAGES:
            us = event.device_time_total if device == "cuda" else event.cpu_time_total
            stages[STAGES[op]] = stages.get(STAGES[op], 0.0) + us / 1e3
    return ";".join(f"{name}={ms:.3f}" for name, ms in sorted(stages.items()))


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, repeats: int) -> List[float]:
    fn()  # warm-up (allocations, lazy init, autotuning)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(cell: Cell, phase: str = "all") -> Dict[str, float]:
    """Time, memory and error of one cell, in this process. ``phase``: "time" (timed runs, error,
    clustering time), "times" (timed runs only), "memory" (peak extra memory over a warm-up and one
    call) or "all"."""
    import torch

    torch.set_num_threads(cell.threads)
    attend = attention_fn(cell)
    q, k, v = make_inputs(cell, structured=False)
    results: Dict[str, float] = {}
    if cell.device == "cpu":
        results["isa_ran"] = isa_ran()
    if cell.passes == "fwd":
        step = lambda: attend(q, k, v)  # noqa: E731
        grad_ctx = torch.no_grad
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        g = torch.randn_like(q)

        def step():
            out = attend(q, k, v)
            out.backward(g)
            q.grad = k.grad = v.grad = None

        grad_ctx = torch.enable_grad
    if phase in ("memory", "all"):
        if cell.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with grad_ctx():
            timed(step, cell.device, 1)
        if cell.device == "cuda":
            results["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            results["peak_mem_mb"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20
    if phase == "memory":
        return results
    with grad_ctx():
        times = timed(step, cell.device, cell.repeats)
    results["times_ms"] = times
    results["median_ms"] = statistics.median(times)
    results["min_ms"] = min(times)
    cluster = clustering_fn(cell)
    if phase != "times" and cell.impl in ("clustered", "i-clustered"):
        with grad_ctx():
            results["stages_ms"] = stage_times(step, cell.device)
    if cell.passes == "fwd" and phase != "times":
        with torch.no_grad():
            if cluster is not None:
                results["clustering_ms"] = statistics.median(timed(lambda: cluster(q, k, v), cell.device, cell.repeats))
            for name, structured in (("err_iid", False), ("err_structured", True)):
                sq, sk, sv = make_inputs(cell, structured)
                exact = torch.nn.functional.scaled_dot_product_attention(sq.float(), sk.float(), sv.float())
                out = attend(sq, sk, sv).float()
                results[name] = float((out - exact).norm() / exact.norm())
                del exact, out
    return results


def isa_ran() -> str:
    """The CPU variants this process runs: the plugin's kernels / ATen's (e.g. "avx2/avx2")."""
    import torch

    from fairseq_plugin.ops import compiled

    kernels = torch.ops.fairseq_clustered.cpu_isa() if compiled.load() else "none"
    return f"{kernels}/{torch.backends.cpu.get_cpu_capability().lower()}"


def run_cell(cell: Cell, isolate: bool, timeout: float) -> Dict[str, float]:
    """On CPU, fresh processes per cell: ``cell.processes`` time it with the allocator users run
    (glibc's default; their timed runs are pooled, because whether glibc keeps freed blocks for reuse
    or returns them to the kernel differs from process to process and moves the compiled paths'
    time by up to 2x at short lengths), and one measures its peak RSS growth with glibc's mmap
    threshold pinned low, so that freed tensors leave the RSS and the peak is the cell's own."""
    if not isolate:
        res = measure(cell)
        res.pop("times_ms")
        return res
    results: Dict[str, float] = {}
    phases = [("time", {})] + [("times", {})] * (cell.processes - 1) + [("memory", {"MALLOC_MMAP_THRESHOLD_": "65536"})]
    times: List[float] = []
    medians: List[float] = []
    for phase, extra in phases:
        env = dict(os.environ, OMP_NUM_THREADS=str(cell.threads), **ISA_ENV[cell.isa], **extra)
        cmd = [sys.executable, __file__, "--_cell", json.dumps(asdict(cell)), "--_phase", phase]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s ({phase})"}
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": tail}
        res = json.loads(done.stdout.strip().splitlines()[-1])
        if phase != "memory":
            times += res.pop("times_ms")
            medians.append(res["median_ms"])
        results.update(res)
    results.update(median_ms=statistics.median(times), min_ms=min(times),
                   process_medians_ms=";".join(f"{m:.3f}" for m in medians))  # fmt: skip
    return results


def fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(argv: Optional[List[str]] = None) -> None:
    from fairseq_plugin.ops.options import OPTIONS, argparse_type

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None,
                        help="float32 (CPU default), bfloat16 or float16 (CUDA; default: float32 at H=4, then bfloat16 at H=8)")  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 1k..16k; CUDA adds 32k)")  # fmt: skip
    parser.add_argument("--impls", nargs="+", default=None, choices=IMPLS + CUDA_IMPLS,
                        help=f"default: {' '.join(IMPLS)} (CUDA adds {' '.join(CUDA_IMPLS)} in half precision)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="fraction of each head's queries made one point (+ noise), so that one cluster holds "
                             "them: the skewed-cluster case (e.g. 0.5)")  # fmt: skip
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 4 (CPU), 8 (CUDA)")
    parser.add_argument("--dim", type=int, default=64)
    for name in ("clusters", "hash_bits", "iterations", "topk"):  # defaults, bounds, help: the ops' own
        opt = OPTIONS[name]
        parser.add_argument(f"--{name.replace('_', '-')}", type=argparse_type(opt.parse), default=opt.default,
                            metavar=opt.metavar, help=f"{opt.help} (default: {opt.default})")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell and process (after one warm-up)")
    parser.add_argument("--processes", type=int, default=3,
                        help="CPU: fresh processes that time each cell; the table shows the median of all their runs")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--isa", nargs="+", default=["best"], choices=list(ISA_ENV),
                        help="CPU: run each cell with these instruction sets, side by side: best (what the CPU "
                             "has), avx2 or default (baseline x86-64), for the plugin's kernels and PyTorch's "
                             "alike (e.g. --isa best avx2 on an AVX-512 machine)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="seconds per cell before it is skipped")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default outputs/benchmarks/attention-<device>-<dtype>.csv; "
                             "attention-cuda.csv for the two CUDA grids)")  # fmt: skip
    parser.add_argument("--_cell", help=argparse.SUPPRESS)
    parser.add_argument("--_phase", default="all", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device != "cpu" and args.isa != ["best"]:
        parser.error("--isa applies to --device cpu only")
    if args.processes < 1 or args.repeats < 1:
        parser.error("--processes and --repeats must be >= 1")
    if not 0 <= args.skew < 1:
        parser.error(f"--skew must be in [0, 1), got {args.skew}")
    if args._cell:  # worker: one cell, JSON on the last line of stdout
        print(json.dumps(measure(Cell(**json.loads(args._cell)), args._phase)))
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    if args.dtype or args.heads or args.device == "cpu":
        dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
        configs = [(dtype, args.heads or (8 if args.device == "cuda" else 4))]
    else:  # CUDA default: the float32 grid at H=4, and H=8 in bfloat16 against SDPA's flash backend
        configs = [("float32", 4), ("bfloat16", 8)]
    lengths = args.lengths or ([1024, 2048, 4096, 8192, 16384] + ([32768] if args.device == "cuda" else []))
    impls = args.impls or IMPLS + (CUDA_IMPLS if args.device == "cuda" else [])
    if args.device != "cuda" and set(impls) & set(CUDA_IMPLS):
        parser.error(f"--impls {' '.join(sorted(set(impls) & set(CUDA_IMPLS)))} needs --device cuda")
    threads = args.threads or torch.get_num_threads()
    name = f"attention-{args.device}-{configs[0][0]}.csv" if len(configs) == 1 else f"attention-{args.device}.csv"
    out = args.out or Path("outputs/benchmarks") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script: the repository, for experiments.*
    from experiments.machine import cpu_model

    cpu = cpu_model()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {threads} threads"

    rows: List[dict] = []
    header = (f"{'L':>6} {'impl':<16} {'pass':<8} {'isa':<16} {'median ms':>10} {'x SDPA':>7} {'peak MB':>8} {'err iid':>8} "
              f"{'err struct':>10} {'clust ms':>8}  stages (ms, one profiled call)")  # fmt: skip
    tmp = out.with_suffix(".csv.partial")
    processes = args.processes if args.device == "cpu" else 1  # CUDA cells run in this process
    runs = f"{args.repeats}" if processes == 1 else f"{processes} processes x {args.repeats}"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for dtype, heads in configs:
            skew = f"; skew {args.skew:g} (one cluster holds that share of the queries)" if args.skew else ""
            print(f"# {device_name}; torch {torch.__version__}; N={args.n} H={heads} E={args.dim} C={args.clusters} "
                  f"B={args.hash_bits} I={args.iterations} k={args.topk} {dtype}; median of {runs}{skew}", flush=True)  # fmt: skip
            print(header, flush=True)
            for length in lengths:
                sdpa_ms: Dict[tuple, float] = {}  # (pass, isa): SDPA's time, the baseline of the same ISA
                for passes, isa, impl in ((p, i, m) for p in args.passes for i in args.isa for m in impls):
                    if impl in CUDA_IMPLS and dtype not in ("float16", "bfloat16"):
                        continue  # cuDNN attention is half precision only
                    cell = Cell(args.device, dtype, threads, args.n, heads, length, args.dim, args.clusters,
                                args.hash_bits, args.iterations, args.topk, impl, passes, args.repeats,
                                processes, args.skew, isa)  # fmt: skip
                    res = run_cell(cell, isolate=args.device == "cpu", timeout=args.timeout)
                    if "error" in res:
                        print(f"{length:>6} {impl:<16} {passes:<8} {isa:<16} skipped: {res['error']}", flush=True)
                        continue
                    if impl == "sdpa":
                        sdpa_ms[passes, isa] = res["median_ms"]
                    base = sdpa_ms.get((passes, isa))
                    speedup = base / res["median_ms"] if base else float("nan")
                    ran = res.get("isa_ran", "-")
                    row = {**{k: v for k, v in asdict(cell).items() if k in CSV_FIELDS}, "pass": passes,
                           "isa_ran": ran,
                           "median_ms": res["median_ms"], "min_ms": res["min_ms"], "peak_mem_mb": res["peak_mem_mb"],
                           "process_medians_ms": res.get("process_medians_ms"),
                           "err_iid": res.get("err_iid"), "err_structured": res.get("err_structured"),
                           "clustering_ms": res.get("clustering_ms"), "speedup_vs_sdpa": speedup,
                           "stages_ms": res.get("stages_ms")}  # fmt: skip
                    writer.writerow(row)
                    handle.flush()
                    rows.append(row)
                    print(f"{length:>6} {impl:<16} {passes:<8} {isa + '=' + ran:<16} {fmt(res['median_ms']):>10} "
                          f"{fmt(speedup, 2):>7} "
                          f"{fmt(res['peak_mem_mb']):>8} {fmt(res.get('err_iid'), 4):>8} "
                          f"{fmt(res.get('err_structured'), 4):>10} {fmt(res.get('clustering_ms'), 2):>8}"
                          f"  {res.get('stages_ms') or ''}", flush=True)  # fmt: skip
    os.replace(tmp, out)  # a complete CSV or none
    print(f"# wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
