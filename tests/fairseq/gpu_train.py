"""fairseq on the GPU (issue 10, deliverable 4), for scripts/gpu_check.sh: tiny masked-LM runs of
every attention type with --fp16, --bf16 and --memory-efficient-fp16, and one run whose fp16 loss
scale starts far too high, so that its first backward passes overflow.

    python tests/fairseq/gpu_train.py OUTDIR                  # CUDA: 4 archs x 3 precisions + overflow, 4 at once
    python tests/fairseq/gpu_train.py OUTDIR --device cpu     # a dry run of the same commands in fp32 on the CPU

Each run is ``python -m fairseq_cli.train`` with the plugin (no console script needed: on the GPU
machines fairseq comes as carried wheels on PYTHONPATH), a few updates on data made by
``python -m fairseq_cli.preprocess`` (tests/fairseq/data.py). A run passes when it exits 0 and logs
a finite training loss for the updates asked; the overflow run must also log fairseq's "gradient
overflow detected" (the inf reached the loss scaler, which lowered the scale and skipped the
update) and still finish its updates. Logs go to OUTDIR/fairseq/<run>.log, results to
OUTDIR/fairseq_gpu.json; exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fairseq.data import masked_lm_data  # noqa: E402

ARCHS = ["softmax_transformer", "clustered_transformer", "i_clustered_transformer", "hardmax_transformer"]
PRECISIONS = {"fp16": ["--fp16"], "bf16": ["--bf16"], "memory-efficient-fp16": ["--memory-efficient-fp16"]}
UPDATES = 3
# head dim 16, 128 tokens: clusters < length and topk < length, so the clustered paths really cluster
MODEL = [
    "--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--max-positions", "128", "--tokens-per-sample", "128",
    "--clusters", "4", "--topk", "8", "--cluster-iterations", "3",
]  # fmt: skip
COMMON = [
    "--user-dir", str(ROOT / "fairseq_plugin"), "--task", "masked_lm", "--criterion", "masked_lm",
    "--required-batch-size-multiple", "1", "--no-progress-bar", "--log-format", "json", "--log-interval", "1",
    "--seed", "1", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8", "--num-workers", "0",
    "--no-save", "--disable-validation", "--max-update", str(UPDATES),
]  # fmt: skip
OVERFLOW = "gradient overflow detected"


def losses(output: str) -> List[float]:
    """The training losses fairseq logged per update (json log format, --log-interval 1)."""
    found = []
    for match in re.finditer(r'"loss": "?([-+\w.]+)"?', output):
        try:
            found.append(float(match.group(1)))
        except ValueError:
            found.append(float("nan"))
    return found


def run(name: str, args: List[str], data: Path, logs: Path, timeout: int) -> Dict[str, object]:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(data), *COMMON, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, rc = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s", 124
    (logs / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + output)
    found = losses(output)
    result = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "losses": found,
              "overflow_logged": OVERFLOW in output}  # fmt: skip
    problems = []
    if rc != 0:
        problems.append(f"exit {rc}: {output.strip().splitlines()[-1] if output.strip() else ''}")
    if len(found) < UPDATES:
        problems.append(f"{len(found)} losses logged, {UPDATES} updates asked")
    if not all(math.isfinite(x) for x in found):
        problems.append(f"a non-finite loss: {found}")
    result["problems"] = problems
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=ARCHS)
    parser.add_argument("--timeout", type=int, default=180, help="seconds per run")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: 4 on CUDA, 1 on the CPU)")
    args = parser.parse_args()
    try:
        import fairseq  # noqa: F401
    except ImportError as err:
        print(f"FAIL fairseq: not importable ({err}); on a GPU machine carry its wheels: "
              "bash scripts/gpu_wheels.sh, then run with carry=['.whl']", file=sys.stderr)  # fmt: skip
        return 1
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("FAIL fairseq: CUDA is not available (--device cpu for a dry run)", file=sys.stderr)
            return 1
    logs = args.outdir / "fairseq"
    logs.mkdir(parents=True, exist_ok=True)
    data = masked_lm_data(Path(tempfile.mkdtemp(prefix="gpu_train-")))
    plan = []
    for arch in args.archs:
        if args.device == "cuda":
            plan += [(f"{arch}-{name}", ["--arch", arch, *MODEL, *flags]) for name, flags in PRECISIONS.items()]
        else:
            plan.append((f"{arch}-fp32", ["--arch", arch, *MODEL, "--cpu"]))
    if args.device == "cuda":  # fairseq's --fp16 needs CUDA
        # 2**24: the scaled loss passes fp16's 65,504 at once, so the scale halves until it fits
        arch = "i_clustered_transformer" if "i_clustered_transformer" in args.archs else args.archs[0]
        plan.append((f"{arch}-fp16-overflow", ["--arch", arch, *MODEL, "--fp16", "--fp16-init-scale", str(2**24)]))
    jobs = args.jobs or (4 if args.device == "cuda" else 1)
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, name, run_args, data, logs, args.timeout): name for name, run_args in plan}
        for future in concurrent.futures.as_completed(futures):
            name, result = futures[future], future.result()
            if name.endswith("-overflow") and not result["overflow_logged"]:
                result["problems"].append(f"no '{OVERFLOW}' in the log: the inf did not reach the loss scaler")
            results[name] = result
            verdict = "ok" if not result["problems"] else "FAIL " + "; ".join(result["problems"])
            print(f"{name:<44} {result['seconds']:>6} s  losses {result['losses']}  {verdict}", flush=True)
    results = {name: results[name] for name, _ in plan}
    (args.outdir / "fairseq_gpu.json").write_text(json.dumps(results, indent=1))
    failed = [name for name, result in results.items() if result["problems"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
