"""Ahead-of-time compile check of every Triton kernel configuration the dispatcher can choose.

Needs no GPU: ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``
lowers each configuration to PTX and a cubin with the ptxas inside the triton wheel. The
configurations are the module-level ``CONFIGS`` lists of the files under fairseq_plugin/ops/triton/
(format: that package's docstring). One row per (configuration, arch):

* registers: ``REG`` of ``cuobjdump --dump-resource-usage`` on the cubin (cuobjdump ships in the wheel);
* spills: spill stores + spill loads (bytes) in the ``ptxas -v`` log of triton's own ptxas call
  (``TRITON_DUMP_PTXAS_LOG=1``, every configuration compiled afresh with ``TRITON_ALWAYS_COMPILE=1``):
  the ptxas and flags of the installed triton (3.9: ``ptxas-blackwell`` from sm_90 on, with
  ``--regAllocOptLevel=2``; 3.6: ``ptxas`` below sm_100, without it);
* shared memory: ``metadata.shared`` (bytes);
* tile: for configurations whose kernel multiplies tiles (``tile_products``), whether the PTX holds
  the arch's tensor-core instruction: ``mma.sync`` (sm_80, sm_86, sm_89, sm_120),
  ``wgmma.mma_async`` (sm_90), ``tcgen05.mma`` (sm_100);
* sass, loops: static SASS instructions of the kernel (``nvdisasm`` from the wheel), and of each
  loop body (from a backward branch's target to the branch) in code order. Times a loop's trip
  count and the warps, and over an SM's issue rate, they bound a kernel's time from below without
  a GPU (docs/gpu.md);
* ptx_required: instructions a configuration says its PTX must hold (``popc`` for the k-means
  distance, which relies on LLVM recognising a popcount idiom) are checked, not printed.

Arguments are compiled without the divisibility-by-16 hints the JIT adds for aligned pointers and
sizes: the variant that runs on unaligned views (the aligned ones vectorise, and for the
clustering kernels used no more registers). It fails (exit 1, one line per failure) on a compile
error, a spill on an arch the kernels are tuned for (sm_80, sm_90; elsewhere spills are reported
in their column), shared memory over the arch's per-block limit (99 KB on sm_86, sm_89 and
sm_120), a tile product without the arch's tensor-core instruction, or a missing required
instruction. The table also goes to a CSV; the first line of the output names the triton that compiled
it (PYTHONPATH=DIR runs another triton: tests/ops/test_triton_compat.py).

    python experiments/benchmarks/compile_kernels.py --arch sm_80,sm_90
    python experiments/benchmarks/compile_kernels.py --arch sm_86,sm_89,sm_100,sm_120   # the other GPUs
    python experiments/benchmarks/compile_kernels.py --arch sm_90 --only kmeans,aggregate --jobs 2
    python experiments/benchmarks/compile_kernels.py --sample        # the last configuration of each kernel
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import importlib
import io
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled; before triton loads
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # triton prints its ptxas -v log: the spills (_spills)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ... which a cache hit would skip
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PACKAGE = "fairseq_plugin.ops.triton"
# Per arch: opt-in shared memory per block, the tensor-core instruction of a tile product, and
# whether the kernels are tuned for it (a spill fails there; elsewhere it is reported, not failed).
# Below sm_80 the dispatcher runs the reference (backend.MIN_CAPABILITY); sm_75 is here to show why
# (``--arch sm_75`` fails: tile products without mma, a backward over 64 KB of shared memory).
ARCHES = {
    75: (64 * 1024, "mma.sync", False),  # T4 (not served: the reference runs)
    80: (163 * 1024, "mma.sync", True),  # A100, A30
    86: (99 * 1024, "mma.sync", False),  # RTX 3090, A10, A40, RTX A6000
    89: (99 * 1024, "mma.sync", False),  # RTX 4090, L4, L40S
    90: (227 * 1024, "wgmma.mma_async", True),  # H100, H200
    100: (227 * 1024, "tcgen05.mma", False),  # B200, GB200
    120: (99 * 1024, "mma.sync", False),  # RTX 5090, RTX PRO 6000 Blackwell
}
TUNED = tuple(arch for arch, (_, _, tuned) in ARCHES.items() if tuned)
FIELDS = ["kernel", "arch", "types", "constexprs", "num_warps", "num_stages", "registers", "shared_bytes",
          "spill_bytes", "tile", "sass", "loops", "status"]


def kernel_files() -> List[str]:
    """The kernel modules of the package (every file but __init__)."""
    pkg = importlib.import_module(PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def configs() -> List[Tuple[str, int]]:
    """(module, index in its CONFIGS) for every configuration; a module without CONFIGS is an error."""
    found = []
    for name in kernel_files():
        module = importlib.import_module(f"{PACKAGE}.{name}")
        if not isinstance(getattr(module, "CONFIGS", None), list):
            raise SystemExit(f"{PACKAGE}.{name} defines no module-level CONFIGS list (see {PACKAGE}'s docstring)")
        found += [(name, i) for i in range(len(module.CONFIGS))]
    return found


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _registers(cubin: str, function: str) -> int:
    """``REG`` of ``function`` in the cubin file, from cuobjdump."""
    dump = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", cubin], capture_output=True,
                          text=True, check=True)
    block = dump.stdout.split(f"Function {function}:", 1)[1].split("Function", 1)[0]
    return int(re.search(r"REG:(\d+)", block).group(1))


def _sass_counts(cubin: str) -> Tuple[int, str]:
    """(instructions, the instructions of each loop body joined by ";") of the cubin file's kernel,
    from nvdisasm: a loop runs from a label to a later branch back to it."""
    listing = subprocess.run([str(_tool("nvdisasm")), "-c", cubin], capture_output=True, text=True, check=True)
    blocks: List[Tuple[str, int]] = [("", 0)]  # (label, instructions up to the next label)
    back: List[Tuple[int, int]] = []  # (block index of the target label, block index of the branch)
    where = {"": 0}
    for line in listing.stdout.splitlines():
        label = re.match(r"^\.(L_x_\d+):", line)
        if label:
            where[label.group(1)] = len(blocks)
            blocks.append((label.group(1), 0))
        elif re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            blocks[-1] = (blocks[-1][0], blocks[-1][1] + 1)
            target = re.search(r"BRA\b.*`\(\.(L_x_\d+)\)", line)
            if target and target.group(1) in where:  # a label seen already: a backward branch
                back.append((where[target.group(1)], len(blocks) - 1))
    loops = [sum(n for _, n in blocks[first : last + 1]) for first, last in back]
    return sum(n for _, n in blocks), ";".join(map(str, loops))


def _spills(ptxas_log: str, function: str) -> int:
    """Spill stores + loads (bytes) of ``function`` in the ``ptxas -v`` log that triton printed while
    compiling it (so the ptxas binary and flags are the installed triton's own, whatever its version)."""
    entry = ptxas_log.split(f"Compiling entry function '{function}'", 1)
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry[-1].split("Compiling entry", 1)[0])
    if len(entry) < 2 or not found:
        raise RuntimeError(f"no ptxas -v report for {function} (TRITON_DUMP_PTXAS_LOG ignored?): {ptxas_log[-300:]!r}")
    return sum(int(a) + int(b) for a, b in found)


def compile_one(name: str, index: int, arch: int) -> Dict[str, object]:
    """Compile one configuration for one arch; a row of the table (status "ok" or why it fails)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = importlib.import_module(f"{PACKAGE}.{name}").CONFIGS[index]
    fn, constexprs = cfg["kernel"], dict(cfg.get("constexprs", {}))
    signature = dict(cfg["signature"], **{key: "constexpr" for key in constexprs})
    types = sorted({t[1:] for t in cfg["signature"].values() if t.startswith("*")})
    row: Dict[str, object] = {
        "kernel": f"{name}.{fn.__name__}", "arch": f"sm_{arch}", "types": "/".join(types),
        "constexprs": " ".join(f"{k}={v}" for k, v in constexprs.items()),
        "num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3),
        "registers": "", "shared_bytes": "", "spill_bytes": "", "tile": "", "sass": "", "loops": "", "status": "ok",
    }
    try:
        options = {"num_warps": row["num_warps"], "num_stages": row["num_stages"]}
        source = ASTSource(fn, signature, constexprs)
        with contextlib.redirect_stdout(io.StringIO()) as ptxas_log:  # triton prints the ptxas -v log
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # a compile error is a result, not a crash of the check
        row["status"] = "compile error: " + " ".join(str(err).split())[:300]
        return row
    function = kernel.metadata.name
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:  # for cuobjdump and nvdisasm
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        registers = _registers(cubin.name, function)
        row["sass"], row["loops"] = _sass_counts(cubin.name)
    spills = _spills(ptxas_log.getvalue(), function)
    shared = int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    shared_limit, tile_instruction, tuned = ARCHES[arch]
    has_tile = tile_instruction in ptx
    row.update(registers=registers, shared_bytes=shared, spill_bytes=spills)
    row["tile"] = tile_instruction.split(".")[0] if has_tile else ("none" if cfg.get("tile_products") else "-")
    problems = []
    if spills and tuned:
        problems.append(f"spills {spills} bytes")
    if shared > shared_limit:
        problems.append(f"shared memory {shared} bytes > {shared_limit}")
    if cfg.get("tile_products") and not has_tile:
        problems.append(f"tile product without {tile_instruction}")
    problems += [f"no {op} in the PTX" for op in cfg.get("ptx_required", ()) if not re.search(rf"\b{re.escape(op)}\b", ptx)]
    if problems:
        row["status"] = "; ".join(problems)
    return row


def _compile_star(job: Tuple[str, int, int]) -> Dict[str, object]:
    return compile_one(*job)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = ", ".join(f"sm_{arch}" for arch in ARCHES)
    parser.add_argument("--arch", default="sm_80,sm_90", help=f"comma-separated, of {known} (default: the tuned sm_80,sm_90)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiles in parallel")
    parser.add_argument("--only", help="comma-separated kernel files (e.g. kmeans,hashing); default: all")
    parser.add_argument("--sample", action="store_true", help="only the last configuration of every kernel (quick)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "compile_kernels.csv")
    args = parser.parse_args(argv)
    arches = []
    for token in args.arch.split(","):
        match = re.fullmatch(r"sm_?(\d+)a?", token.strip())
        if not match or int(match.group(1)) not in ARCHES:
            parser.error(f"--arch: {token!r} is not one of {known}")
        arches.append(int(match.group(1)))

    chosen = [(name, index) for name, index in configs() if args.only is None or name in args.only.split(",")]
    if args.sample:  # the last (usually the largest) configuration of every kernel
        last = {}
        for name, index in chosen:
            last[(name, importlib.import_module(f"{PACKAGE}.{name}").CONFIGS[index]["kernel"].__name__)] = index
        chosen = [(name, index) for (name, _), index in last.items()]
    jobs = [(name, index, arch) for name, index in chosen for arch in arches]
    import triton

    print(f"triton {triton.__version__} ({Path(triton.__file__).parent})", flush=True)
    if args.jobs > 1:
        context = multiprocessing.get_context("fork")  # the workers inherit the imported modules
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            rows = list(pool.map(_compile_star, jobs))
    else:
        rows = [compile_one(*job) for job in jobs]

    widths = {f: max(len(f), *(len(str(r[f])) for r in rows)) for f in FIELDS if f != "status"}
    print("  ".join(f.ljust(widths.get(f, 0)) for f in FIELDS))
    for r in rows:
        print("  ".join(str(r[f]).ljust(widths.get(f, 0)) for f in FIELDS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    untuned = [r for r in rows if r["spill_bytes"] and int(r["arch"][3:]) not in TUNED]
    for r in untuned:
        print(f"note: {r['kernel']} {r['arch']} [{r['types']} {r['constexprs']}] spills {r['spill_bytes']} bytes "
              f"(tuned for {', '.join(f'sm_{a}' for a in TUNED)} only: slower there, not wrong)")
    failures = [r for r in rows if r["status"] != "ok"]
    for r in failures:
        print(f"FAIL {r['kernel']} {r['arch']} [{r['types']} {r['constexprs']}]: {r['status']}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
