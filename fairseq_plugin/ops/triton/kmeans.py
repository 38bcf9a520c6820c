"""Hamming k-means on packed LSH codes in Triton, parallel over chunks of queries.

The reference is :func:`fairseq_plugin.ops.kmeans.kmeans_from_seeds`; given the same ``init`` and
``reseed`` (drawn up front by ``draw_kmeans_seeds``) the assignments and counts are identical bit
for bit. One Lloyd iteration is two launches:

* ``_assign_kernel`` (grid: N·H × L/BLOCK_L): each program takes BLOCK_L queries, one a thread,
  and walks the centroids one at a time, keeping the running minimum of distance · 2^16 + index
  (popcount(h xor c), ties to the lowest index) in registers: no reduction across threads. It then
  adds its per-cluster per-bit counts into int32 counters with atomics: over chunks of BLOCK_C
  clusters, one tile product, one-hot (BLOCK_C, BLOCK_L) @ bits (BLOCK_L, 64), in fp16 with fp32
  accumulation, exact since every count is <= BLOCK_L. Bit 63 is never a code bit, so its column
  is set to one and counts the members. Integer atomics make the counts deterministic.
* ``_update_kernel`` (grid: N·H × C/BLOCK_C): majority vote (a tie votes 0), an empty cluster
  takes the code of its ``reseed`` query, and the counters are zeroed for the next iteration.

Static SASS counts (sm_90, triton 3.9) of the iteration pass at C = 100: about 13.5 instructions per
thread per (query, centroid) distance and 690 per thread per chunk of the counts. That is 85 warp
instructions a query a pass, against 218 for the former (64 queries, 64 centroids) tiles, whose
row minimum cost shuffles and shared-memory rounds (docs/gpu.md). Folding the update into the next assign
pass (each program re-voting the centroids it needs) would save a launch an iteration but, at
BLOCK_L = 64, doubled the distance loop's instructions; it is not done.

The last pass assigns once more and writes per-block cluster histograms (padding counted as
cluster C); a cumulative sum over blocks gives every (block, cluster) its first slot, and
``_order_kernel`` places each query at that slot plus its rank among the block's queries of the
same cluster. So ``order`` (N, H, L) int32 lists the queries by cluster, stable, padded last,
and ``offsets`` (N, H, C+1) int32 bounds cluster j at ``offsets[j]:offsets[j+1]`` (``offsets[C]``
= the real queries). Nothing sorts, nothing syncs with the host, the grids depend on shapes only:
the whole op can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L = 256  # queries per program, one a thread
BLOCK_C = 64  # centroids per chunk of the per-bit counts and histograms
UNROLL = 4  # centroids per step of the distance loop
MAX_CLUSTERS = 1 << 16  # the distance loop packs a cluster index in 16 bits
SUB_L = 64  # queries per step of the order kernel's ranking
BITS = 64  # the width of the per-bit counters (codes use at most 63)
WARPS = 8  # BLOCK_L / 32


@triton.jit
def _popcount32(x):
    """Bits set in each uint32 of x, in the form LLVM's idiom recognition turns into one popc.b32
    (compile_kernels.py fails if the PTX has no popc); libdevice.popc has no interpreter version."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _popcount(x):
    """Bits set in each int64 of x, as int32: two 32-bit counts (a 64-bit form of the idiom was
    not recognised once its result was shifted)."""
    x = x.to(tl.uint64, bitcast=True)
    return (_popcount32(x.to(tl.uint32)) + _popcount32((x >> 32).to(tl.uint32))).to(tl.int32)


@triton.jit
def _assign_kernel(
    codes_ptr,  # (NH, L) int64, bits >= hash_bits cleared
    real_ptr,  # (N, L) int8, 1 = a real query
    cent_ptr,  # (NH, C) int64 centroid codes
    ones_ptr,  # (NH, C, 64) int32 per-bit member counts, column 63 the members, accumulated (not FINAL)
    assign_ptr,  # (NH, L) int64, written (FINAL)
    hist_ptr,  # (NH, n_blocks, C + 1) int32 members per (block, cluster), written (FINAL)
    L,
    C,
    H,
    n_blocks,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNROLL: tl.constexpr,
    FINAL: tl.constexpr,
):
    nh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rows = blk * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    in_range = rows < L
    codes = tl.load(codes_ptr + nh * L + rows, mask=in_range, other=0)  # (BLOCK_L,)
    real = tl.load(real_ptr + (nh // H) * L + rows, mask=in_range, other=0) != 0
    cols = tl.arange(0, BLOCK_C)

    # One query a thread, one centroid a step, no reduction across threads: the nearest is the
    # running minimum of distance * 2^16 + index (C < 2^16), so a tie goes to the lowest index.
    # The steps past C - 1 repeat centroid C - 1, which changes no minimum.
    best = tl.full([BLOCK_L], 127 << 16, tl.int32)  # above any key (distance <= 63)
    cent_row = cent_ptr + nh * C
    for c0 in range(0, C, UNROLL):
        for u in tl.static_range(UNROLL):
            c = tl.minimum(c0 + u, C - 1)
            dist = _popcount(codes ^ tl.load(cent_row + c))
            best = tl.minimum(best, (dist << 16) | c)  # (a shift by 24 hid the popcount from LLVM)
    best_c = tl.where(real, best & 0xFFFF, -1)  # (BLOCK_L,) -1 = padded

    if FINAL:
        tl.store(assign_ptr + nh * L + rows, best_c.to(tl.int64), mask=in_range)
        hist_row = hist_ptr + (nh * n_blocks + blk) * (C + 1)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + cols
            member = best_c[None, :] == cs[:, None]  # (BLOCK_C, BLOCK_L)
            tl.store(hist_row + cs, tl.sum(member.to(tl.int32), axis=1), mask=cs < C)
        padded = in_range & (real == 0)
        tl.store(hist_row + C, tl.sum(padded.to(tl.int32), axis=0))
    else:
        # per-bit member counts as one tile product a chunk; column 63 (never a code bit) is all
        # ones, so it counts the members
        bit = tl.arange(0, 64)
        bits = tl.where(bit[None, :] == 63, 1, (codes[:, None] >> bit[None, :].to(tl.int64)) & 1)
        bits = bits.to(tl.float16)  # (BLOCK_L, 64)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + cols
            member = (best_c[None, :] == cs[:, None]).to(tl.float16)  # (BLOCK_C, BLOCK_L)
            ones = tl.dot(member, bits).to(tl.int32)  # (BLOCK_C, 64), exact (<= BLOCK_L)
            ones_at = ones_ptr + (nh * C + cs)[:, None] * 64 + bit[None, :]
            tl.atomic_add(ones_at, ones, mask=(cs < C)[:, None] & (ones > 0), sem="relaxed")


@triton.jit
def _update_kernel(
    codes_ptr,  # (NH, L) int64, bits >= hash_bits cleared
    cent_ptr,  # (NH, C) int64, overwritten
    ones_ptr,  # (NH, C, 64) int32, column 63 the members, read then zeroed
    reseed_ptr,  # (NH, C) int64 query positions for empty clusters (this iteration's)
    L,
    C,
    BLOCK_C: tl.constexpr,
):
    nh = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    valid = cs < C
    bit = tl.arange(0, 64)
    ones_at = ones_ptr + (nh * C + cs)[:, None] * 64 + bit[None, :]
    ones = tl.load(ones_at, mask=valid[:, None], other=0)  # (BLOCK_C, 64)
    size = tl.load(ones_ptr + (nh * C + cs) * 64 + 63, mask=valid, other=0)  # (BLOCK_C,)
    vote = ((2 * ones > size[:, None]) & (bit[None, :] < 63)).to(tl.int64)  # majority; a tie votes 0
    packed = tl.sum(vote << bit[None, :].to(tl.int64), axis=1)  # distinct bits: sum = or
    seed = tl.load(reseed_ptr + nh * C + cs, mask=valid, other=0)
    seed_code = tl.load(codes_ptr + nh * L + seed, mask=valid, other=0)
    tl.store(cent_ptr + nh * C + cs, tl.where(size == 0, seed_code, packed), mask=valid)
    tl.store(ones_at, tl.zeros([BLOCK_C, 64], tl.int32), mask=valid[:, None])


@triton.jit
def _order_keys(assign_ptr, nh, rows, L, C):
    """The clusters of queries ``rows`` as sort keys: padding (and rows past L) as cluster C, last."""
    a = tl.load(assign_ptr + nh * L + rows, mask=rows < L, other=-1)
    return tl.where(a < 0, C, a).to(tl.int32)


@triton.jit
def _order_kernel(
    assign_ptr,  # (NH, L) int64, -1 = padded
    base_ptr,  # (NH, n_blocks, C + 1) int32 first slot of each (block, cluster)
    order_ptr,  # (NH, L) int32, written
    L,
    C,
    n_blocks,
    BLOCK_L: tl.constexpr,
    SUB_L: tl.constexpr,
):
    nh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    j = tl.arange(0, SUB_L)
    # the block's queries SUB_L at a time: a query's rank is the number of earlier ones of its cluster
    for s in tl.static_range(BLOCK_L // SUB_L):
        rows = blk * BLOCK_L + s * SUB_L + j
        in_range = rows < L
        key = _order_keys(assign_ptr, nh, rows, L, C)
        same = (key[None, :] == key[:, None]) & (j[None, :] < j[:, None]) & in_range[None, :]  # (SUB_L, SUB_L)
        rank = tl.sum(same.to(tl.int32), axis=1)
        for t in tl.static_range(s):
            rows_t = blk * BLOCK_L + t * SUB_L + j
            key_t = _order_keys(assign_ptr, nh, rows_t, L, C)
            rank += tl.sum(((key_t[None, :] == key[:, None]) & (rows_t < L)[None, :]).to(tl.int32), axis=1)
        base = tl.load(base_ptr + (nh * n_blocks + blk) * (C + 1) + key, mask=in_range, other=0)
        tl.store(order_ptr + nh * L + base + rank, rows.to(tl.int32), mask=in_range)


_SCALARS = {"L": "i32", "C": "i32", "H": "i32", "n_blocks": "i32"}
CONFIGS = [
    {
        "kernel": _assign_kernel,
        "signature": {
            "codes_ptr": "*i64", "real_ptr": "*i8", "cent_ptr": "*i64", "ones_ptr": "*i32", "assign_ptr": "*i64",
            "hist_ptr": "*i32", **_SCALARS,
        },
        "constexprs": {"BLOCK_L": BLOCK_L, "BLOCK_C": BLOCK_C, "UNROLL": UNROLL, "FINAL": final},
        "num_warps": WARPS,
        "tile_products": not final,
        "ptx_required": ("popc.b32",),  # the distance's popcount idiom, recognised by LLVM
    }
    for final in (False, True)
] + [
    {
        "kernel": _update_kernel,
        "signature": {
            "codes_ptr": "*i64", "cent_ptr": "*i64", "ones_ptr": "*i32", "reseed_ptr": "*i64", "L": "i32", "C": "i32",
        },
        "constexprs": {"BLOCK_C": BLOCK_C},
        "num_warps": WARPS,
    },
    {
        "kernel": _order_kernel,
        "signature": {
            "assign_ptr": "*i64", "base_ptr": "*i32", "order_ptr": "*i32", "L": "i32", "C": "i32", "n_blocks": "i32",
        },
        "constexprs": {"BLOCK_L": BLOCK_L, "SUB_L": SUB_L},
        "num_warps": 4,
    },
]


def _check(codes: Tensor, init: Tensor, reseed: Tensor, padding_mask: Optional[Tensor], hash_bits: int) -> None:
    if codes.dtype != torch.int64 or codes.dim() != 3:
        raise ValueError(f"codes must be an int64 tensor (N, H, L), got {codes.dtype} {tuple(codes.shape)}")
    n, h, length = codes.shape
    if init.dtype != torch.int64 or init.dim() != 3 or init.shape[:2] != codes.shape[:2] or init.shape[2] < 1:
        raise ValueError(f"init must be an int64 tensor (N={n}, H={h}, C>=1), got {init.dtype} {tuple(init.shape)}")
    if init.shape[2] >= MAX_CLUSTERS:
        raise ValueError(f"clusters must be below {MAX_CLUSTERS} on the Triton path, got {init.shape[2]}: use fewer clusters")
    if reseed.dtype != torch.int64 or reseed.dim() != 4 or reseed.shape[1:] != init.shape:
        raise ValueError(
            f"reseed must be an int64 tensor (I, {n}, {h}, {init.shape[2]}), got {reseed.dtype} {tuple(reseed.shape)}"
        )
    if padding_mask is not None and (padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (n, length)):
        raise ValueError(
            f"padding_mask must be a bool tensor ({n}, {length}), got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    for name, t in (("init", init), ("reseed", reseed), ("padding_mask", padding_mask)):
        if t is not None and t.device != codes.device:
            raise ValueError(f"{name} must be on {codes.device} like codes, got {t.device}")
    if not 1 <= hash_bits <= 63:
        raise ValueError(f"hash_bits must be in [1, 63], got {hash_bits}")


@torch.library.custom_op("fairseq_clustered_triton::hamming_kmeans", mutates_args=())
def hamming_kmeans(
    codes: Tensor, init: Tensor, reseed: Tensor, padding_mask: Optional[Tensor], hash_bits: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``reseed.shape[0]`` Lloyd iterations from the centroids ``codes[init]``, then a final assignment.

    Returns ``(assignment, counts, order, offsets)``: assignment (N, H, L) int64 (-1 = padded),
    counts (N, H, C) int64, order (N, H, L) int32 and offsets (N, H, C+1) int32 (module docstring).
    """
    _check(codes, init, reseed, padding_mask, hash_bits)
    n, h, length = codes.shape
    c, nh = init.shape[2], n * h
    n_blocks = triton.cdiv(length, BLOCK_L)
    codes = (codes & ((1 << hash_bits) - 1)).contiguous()  # the reference ignores the higher bits too
    cent = codes.gather(2, init).contiguous()  # (N, H, C)
    if padding_mask is None:
        real = torch.ones(n, length, dtype=torch.int8, device=codes.device)
    else:
        real = (~padding_mask).to(torch.int8).contiguous()
    ones = torch.zeros(nh, c, BITS, dtype=torch.int32, device=codes.device)
    assignment = torch.empty(n, h, length, dtype=torch.int64, device=codes.device)
    hist = torch.empty(nh, n_blocks, c + 1, dtype=torch.int32, device=codes.device)
    reseed = reseed.contiguous()
    assign_grid, update_grid = (nh, n_blocks), (nh, triton.cdiv(c, BLOCK_C))
    args = (codes, real, cent, ones, assignment, hist, length, c, h, n_blocks)
    for step in range(reseed.shape[0]):
        _assign_kernel[assign_grid](*args, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, UNROLL=UNROLL, FINAL=False, num_warps=WARPS)
        _update_kernel[update_grid](codes, cent, ones, reseed[step], length, c, BLOCK_C=BLOCK_C, num_warps=WARPS)
    _assign_kernel[assign_grid](*args, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, UNROLL=UNROLL, FINAL=True, num_warps=WARPS)

    # Counting sort: cluster j's slots start at offsets[j]; block b's members of j follow those
    # of the blocks before it.
    members = hist.sum(1, dtype=torch.int32)  # (NH, C + 1), the last column counts padding
    offsets = torch.zeros(nh, c + 2, dtype=torch.int32, device=codes.device)
    offsets[:, 1:] = members.cumsum(1, dtype=torch.int32)
    base = offsets[:, None, : c + 1] + hist.cumsum(1, dtype=torch.int32) - hist  # (NH, n_blocks, C + 1)
    order = torch.empty(n, h, length, dtype=torch.int32, device=codes.device)
    _order_kernel[assign_grid](assignment, base.contiguous(), order, length, c, n_blocks, BLOCK_L=BLOCK_L, SUB_L=SUB_L)
    counts = members[:, :c].to(torch.int64).view(n, h, c)
    return assignment, counts, order, offsets[:, : c + 1].reshape(n, h, c + 1).contiguous()


@hamming_kmeans.register_fake
def _(codes, init, reseed, padding_mask, hash_bits):
    n, h, length = codes.shape
    c = init.shape[2]
    return (
        codes.new_empty(n, h, length),
        codes.new_empty(n, h, c),
        codes.new_empty(n, h, length, dtype=torch.int32),
        codes.new_empty(n, h, c + 1, dtype=torch.int32),
    )
