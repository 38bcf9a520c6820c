"""LSH hashing in Triton: projection, threshold and packing into int64 codes, fused.

``lsh_hash(x (..., E), planes (B, E + 1)) -> (...) int64``: bit b of a code is
``[x · planes[b, :E] > planes[b, E]]``, as in the reference (:func:`fairseq_plugin.ops.hashing.lsh_hash`).
A program hashes BLOCK_R rows against all planes (padded to 64) with one fp32 tile product per
BLOCK_E features: x is converted to fp32 first, as the reference does, and the product is IEEE
fp32 (no tf32, which would flip many bits).

What is guaranteed: the thresholding and packing are exact, so the codes equal the reference's
whenever the fp32 projections are equal, e.g. whenever every product and partial sum is exact
(integer-valued inputs, the test's bit-identity check). In general the projection sums run in
another order than the reference's GEMM, so a projection within a few fp32 ulps of its threshold
can land on the other side: such bits may differ, no others.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_R = 64  # rows per program
BLOCK_E = 16  # features per tile product
WARPS = 8  # 4 warps need ~210 registers a thread for the (64, 64) fp32 products
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@triton.jit
def _lsh_hash_kernel(
    x_ptr,  # (R, E)
    planes_ptr,  # (B, E + 1) float32
    codes_ptr,  # (R,) int64
    R,
    E,
    B,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    in_range = rows < R
    b = tl.arange(0, 64)  # plane index, B <= 63
    has_plane = b < B
    proj = tl.zeros([BLOCK_R, 64], tl.float32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        x = tl.load(x_ptr + rows[:, None] * E + es[None, :], mask=in_range[:, None] & (es < E)[None, :], other=0)
        a = tl.load(planes_ptr + b[None, :] * (E + 1) + es[:, None], mask=has_plane[None, :] & (es < E)[:, None],
                    other=0)  # (BLOCK_E, 64)
        proj = tl.dot(x.to(tl.float32), a, proj, input_precision="ieee")  # (BLOCK_R, 64)
    threshold = tl.load(planes_ptr + b * (E + 1) + E, mask=has_plane, other=0)  # (64,)
    bits = (proj > threshold[None, :]) & has_plane[None, :]
    codes = tl.sum(bits.to(tl.int64) << b[None, :].to(tl.int64), axis=1)  # distinct bits: sum = or
    tl.store(codes_ptr + rows, codes, mask=in_range)


CONFIGS = [
    {
        "kernel": _lsh_hash_kernel,
        "signature": {
            "x_ptr": _PTR[dt], "planes_ptr": "*fp32", "codes_ptr": "*i64", "R": "i32", "E": "i32", "B": "i32",
        },
        "constexprs": {"BLOCK_R": BLOCK_R, "BLOCK_E": BLOCK_E},
        "num_warps": WARPS,
        # IEEE fp32 products by design (the codes must match the fp32 reference): no tensor cores.
        "tile_products": False,
    }
    for dt in _DTYPES
]


@torch.library.custom_op("fairseq_clustered_triton::lsh_hash", mutates_args=())
def lsh_hash(x: Tensor, planes: Tensor) -> Tensor:
    """Hash x (..., E) with hyperplanes (B, E + 1), B <= 63, into int64 codes (...)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if planes.dtype != torch.float32 or planes.dim() != 2 or planes.shape[1] != x.shape[-1] + 1:
        raise ValueError(
            f"planes must be a float32 tensor (B, E + 1={x.shape[-1] + 1}), got {planes.dtype} {tuple(planes.shape)}"
        )
    if not 1 <= planes.shape[0] <= 63:
        raise ValueError(f"planes must hold 1 to 63 planes (hash bits), got {planes.shape[0]}")
    if planes.device != x.device:
        raise ValueError(f"planes must be on {x.device} like x, got {planes.device}")
    e = x.shape[-1]
    rows = x.reshape(-1, e).contiguous()  # (R, E)
    codes = torch.empty(rows.shape[0], dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(rows.shape[0], BLOCK_R),)
    _lsh_hash_kernel[grid](rows, planes.contiguous(), codes, rows.shape[0], e, planes.shape[0],
                           BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E, num_warps=WARPS)
    return codes.view(x.shape[:-1])


@lsh_hash.register_fake
def _(x, planes):
    return x.new_empty(x.shape[:-1], dtype=torch.int64)
