"""Per-cluster sums and their broadcast back to the queries, in Triton; each the other's adjoint.

* ``cluster_sum(x (N, H, L, E), assignment (N, H, L), clusters) -> (N, H, C, E) float32``: the sum
  of each cluster's member rows, accumulated in fp32 whatever the input dtype (fp16 sums overflow
  at 65504). Parallel over chunks of BLOCK_L queries: a program multiplies the one-hot
  (BLOCK_C, BLOCK_L) of its queries by their rows (BLOCK_L, BLOCK_E) (a tile product with fp32
  accumulation; the one-hot makes the products exact) and adds the rows of the clusters present
  with fp32 atomics, so a skewed cluster costs nothing extra. The atomics make the summation
  order, hence the last bits, vary from run to run. A NaN or inf is left out of the product
  (0 * NaN would reach every cluster of the tile) and added to its own cluster alone, so it
  poisons that cluster's sum and no other.
* ``cluster_broadcast(y (N, H, C, M), assignment) -> (N, H, L, M)``: row ``assignment[l]`` of y for
  every query, zeros for padded queries (assignment -1).

Both are ``torch.library.custom_op`` s with fake kernels; the backward of one is the other
(the gradient of a sum is cast back to the dtype of x, that of a broadcast to the dtype of y).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L = 64
BLOCK_C = 64
BLOCK_M = 64
SUM_WARPS = 8  # 4 warps hold the (64, 64) tiles in ~235 registers a thread
_BLOCK_E = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 16}  # fp32 IEEE products: 32 spills on sm_80
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@triton.jit
def _cluster_sum_kernel(
    x_ptr,  # (NH, L, E)
    assign_ptr,  # (NH, L) int64, -1 = padded
    out_ptr,  # (NH, C, E) float32, zero on entry
    L,
    C,
    E,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_FP32: tl.constexpr,  # multiply in fp32 (fp32 inputs; bf16 under the interpreter)
):
    nh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    es = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)  # (BLOCK_E,)
    x_ptr += nh * L * E  # int64 bases, int32 offsets within a head
    out_ptr += nh * C * E
    in_range = rows < L
    a = tl.load(assign_ptr + nh * L + rows, mask=in_range, other=-1).to(tl.int32)
    valid = (a >= 0)[:, None] & (es < E)[None, :]  # (BLOCK_L, BLOCK_E)
    x = tl.load(x_ptr + rows[:, None] * E + es[None, :], mask=valid, other=0)
    # 0 * NaN = NaN: in the one-hot product a NaN / inf would reach every cluster of the chunk.
    # Non-finite values are left out of it and added to their own cluster alone.
    finite = tl.abs(x.to(tl.float32)) < float("inf")  # False for NaN and +-inf
    bad = valid & (finite == 0)
    if tl.sum(bad.to(tl.int32)) > 0:  # rare: only a tile holding a NaN / inf pays
        tl.atomic_add(out_ptr + a[:, None] * E + es[None, :], x.to(tl.float32), mask=bad, sem="relaxed")
    safe = tl.where(finite, x, tl.zeros_like(x))
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + cols
        member = a[None, :] == cs[:, None]  # (BLOCK_C, BLOCK_L); padded rows match no cluster
        if DOT_FP32:
            part = tl.dot(member.to(tl.float32), safe.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(member.to(x.dtype), safe)  # (BLOCK_C, BLOCK_E) fp32
        present = (tl.sum(member.to(tl.int32), axis=1) > 0) & (cs < C)
        tl.atomic_add(out_ptr + cs[:, None] * E + es[None, :], part,
                      mask=present[:, None] & (es < E)[None, :], sem="relaxed")


@triton.jit
def _cluster_broadcast_kernel(
    y_ptr,  # (NH, C, M)
    assign_ptr,  # (NH, L) int64, -1 = padded
    out_ptr,  # (NH, L, M)
    L,
    C,
    M,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    nh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ms = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = rows < L
    a = tl.load(assign_ptr + nh * L + rows, mask=in_range, other=-1)
    cols = (ms < M)[None, :]
    y = tl.load(y_ptr + (nh * C + a)[:, None] * M + ms[None, :], mask=(a >= 0)[:, None] & cols, other=0)
    tl.store(out_ptr + (nh * L + rows)[:, None] * M + ms[None, :], y, mask=in_range[:, None] & cols)


CONFIGS = [
    {
        "kernel": _cluster_sum_kernel,
        "signature": {"x_ptr": _PTR[dt], "assign_ptr": "*i64", "out_ptr": "*fp32", "L": "i32", "C": "i32", "E": "i32"},
        "constexprs": {
            "BLOCK_L": BLOCK_L, "BLOCK_C": BLOCK_C, "BLOCK_E": _BLOCK_E[dt], "DOT_FP32": dt == torch.float32,
        },
        "num_warps": SUM_WARPS,
        # fp32 is multiplied in IEEE fp32 (exact sums, no tf32): no tensor cores by design.
        "tile_products": dt != torch.float32,
    }
    for dt in _DTYPES
] + [
    {
        "kernel": _cluster_broadcast_kernel,
        "signature": {"y_ptr": _PTR[dt], "assign_ptr": "*i64", "out_ptr": _PTR[dt], "L": "i32", "C": "i32", "M": "i32"},
        "constexprs": {"BLOCK_L": BLOCK_L, "BLOCK_M": BLOCK_M},
    }
    for dt in _DTYPES
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(t: Tensor, name: str, assignment: Tensor, what: str) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {what}, got shape {tuple(t.shape)}")
    if assignment.dtype != torch.int64 or assignment.dim() != 3 or assignment.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"assignment must be an int64 tensor (N={t.shape[0]}, H={t.shape[1]}, L), got {assignment.dtype} "
            f"{tuple(assignment.shape)}"
        )
    if assignment.device != t.device:
        raise ValueError(f"assignment must be on {t.device} like {name}, got {assignment.device}")


@torch.library.custom_op("fairseq_clustered_triton::cluster_sum", mutates_args=())
def cluster_sum(x: Tensor, assignment: Tensor, clusters: int) -> Tensor:
    """Sum of the rows of x (N, H, L, E) per cluster: (N, H, C, E) float32; padded queries add nothing."""
    _check(x, "x", assignment, "(N, H, L, E)")
    if assignment.shape[2] != x.shape[2]:
        raise ValueError(f"assignment must have L={x.shape[2]} positions like x, got {tuple(assignment.shape)}")
    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    n, h, length, e = x.shape
    out = torch.zeros(n, h, clusters, e, dtype=torch.float32, device=x.device)
    dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreting())
    block_e = _BLOCK_E[x.dtype]
    grid = (n * h, triton.cdiv(length, BLOCK_L), triton.cdiv(e, block_e))
    _cluster_sum_kernel[grid](
        x.contiguous(), assignment.contiguous(), out, length, clusters, e,
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, BLOCK_E=block_e, DOT_FP32=dot_fp32, num_warps=SUM_WARPS,
    )
    return out


@cluster_sum.register_fake
def _(x, assignment, clusters):
    n, h, _, e = x.shape
    return x.new_empty(n, h, clusters, e, dtype=torch.float32)


@torch.library.custom_op("fairseq_clustered_triton::cluster_broadcast", mutates_args=())
def cluster_broadcast(y: Tensor, assignment: Tensor) -> Tensor:
    """Row ``assignment[l]`` of y (N, H, C, M) for every query: (N, H, L, M); zeros where assignment is -1."""
    _check(y, "y", assignment, "(N, H, C, M)")
    n, h, c, m = y.shape
    length = assignment.shape[2]
    out = torch.empty(n, h, length, m, dtype=y.dtype, device=y.device)
    grid = (n * h, triton.cdiv(length, BLOCK_L), triton.cdiv(m, BLOCK_M))
    _cluster_broadcast_kernel[grid](y.contiguous(), assignment.contiguous(), out, length, c, m,
                                    BLOCK_L=BLOCK_L, BLOCK_M=BLOCK_M)
    return out


@cluster_broadcast.register_fake
def _(y, assignment):
    n, h, _, m = y.shape
    return y.new_empty(n, h, assignment.shape[2], m)


def _setup(ctx, inputs, output):
    ctx.assignment = inputs[1]
    ctx.dtype = inputs[0].dtype
    ctx.clusters = inputs[0].shape[2]  # for a broadcast: C of y


def _sum_backward(ctx, grad):
    return cluster_broadcast(grad.float().contiguous(), ctx.assignment).to(ctx.dtype), None, None


def _broadcast_backward(ctx, grad):
    return cluster_sum(grad.contiguous(), ctx.assignment, ctx.clusters).to(ctx.dtype), None


cluster_sum.register_autograd(_sum_backward, setup_context=_setup)
cluster_broadcast.register_autograd(_broadcast_backward, setup_context=_setup)
