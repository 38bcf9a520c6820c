"""The top-k attention of improved-clustered attention, FlashAttention-style (DESIGN.md §2).

For query i of cluster j, with T_j the cluster's top-k keys, m̂_j their centroid mass and rest_j
(fp32) the centroid attention of the other keys:

    out_i = m̂_j · O_i + rest_j,    O_i = Σ_{t∈T_j} softmax_t(τ q_i·k_t) v_t.

Tiles: one program per (batch·head, tile), a tile = up to BLOCK_M queries of one cluster, taken
from ``order[offsets[j]:offsets[j+1]]`` (the queries sorted by cluster). The grid is (N·H, NT),
NT = ``cdiv(L, BLOCK_M) + C`` tiles per (n, h), a fixed upper bound (heads on axis 0: CUDA caps
axis 1 at 65,535, which N·H can pass), and a device-side tile table maps each program to
(cluster, first row); spare programs exit at once. Nothing syncs with the host, so the
op can be captured in a CUDA graph, and a skewed cluster costs only its own tiles.

Forward: the tile's queries stay in registers; the cluster's k keys and values are loaded once per
tile, BLOCK_N at a time (QKᵀ and PV with ``tl.dot``, online softmax in fp32); the kernel writes
``out`` directly, plus O and the log-sum-exp for the backward (no weights are stored).

Backward (FlashAttention-2 recomputation, same tiles): P = exp(τ q kᵀ - lse), dO' = m̂·dout,
dS = P ⊙ (dO' Vᵀ - m̂·(dout·O)), dQ = τ dS K written per tile, dK = τ dSᵀ Q and dV = Pᵀ dO' added
into fp32 buffers with ``tl.atomic_add``: tiles of one cluster, and clusters sharing keys, add
into the same rows, so dK/dV are **not bitwise deterministic** (fp32 sums in arrival order). The
gradients of m̂ (Σ_i dout_i·O_i) and rest (Σ_i dout_i) per cluster are scatter-adds in torch.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .topk import MAX_TOPK, softmax_topk

MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile(TILES, OFFSETS, ORDER, pid, bh, C, L, BLOCK_M: tl.constexpr):
    """(cluster j or C for a spare tile, query indices (BLOCK_M,), row validity (BLOCK_M,)) of
    entry ``pid`` = bh·NT + tile of TILES (N·H, NT, 2)."""
    entry = TILES + pid * 2
    j = tl.load(entry)
    row0 = tl.load(entry + 1)
    end = tl.load(OFFSETS + bh * (C + 1) + tl.minimum(j + 1, C))
    end = tl.where(j < C, end, row0)  # a spare tile holds no rows
    rows = row0 + tl.arange(0, BLOCK_M)
    valid = rows < end
    qidx = tl.load(ORDER + bh * L + rows, mask=valid, other=0)
    qidx = tl.minimum(tl.maximum(qidx, 0), L - 1)
    return j, qidx, valid


@triton.jit
def _tile_queries(Q, bh, qidx, valid, L, E, BLOCK_E: tl.constexpr, CAST_F32: tl.constexpr):
    """The tile's queries (BLOCK_M, BLOCK_E), zeros in padded rows and columns (fp32 when CAST_F32)."""
    ce = tl.arange(0, BLOCK_E)
    q = tl.load(Q + bh * L * E + (qidx[:, None] * E + ce[None, :]), mask=valid[:, None] & (ce < E)[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _keys(TOP, KPM, bh, batch, j, kb, C, S, KK, BLOCK_N: tl.constexpr):
    """(key indices (BLOCK_N,) in [0, S), whether each is a real key of T_j) for chunk kb."""
    slot = kb + tl.arange(0, BLOCK_N)
    used = slot < KK
    t = tl.load(TOP + (bh * C + j) * KK + slot, mask=used, other=0)
    t = tl.minimum(tl.maximum(t, 0), S - 1)
    used = used & (tl.load(KPM + batch * S + t) == 0)
    return t, used


@triton.jit
def _topk_attn_fwd(
    Q, K, V,  # (N*H, L, E), (N*H, S, E), (N*H, S, M)
    TOP, MASS, REST,  # (N*H, C, KK) i32, (N*H, C) fp32, (N*H, C, M) fp32
    KPM, ORDER, OFFSETS, TILES,  # (N, S) i8 (zeros without a mask), (N*H, L) i32, (N*H, C+1) i32, (N*H, T, 2) i32
    OUT, O, LSE,  # (N*H, L, M) q dtype, (N*H, L, M) q dtype, (N*H, L) fp32
    scale, H, L, S, C, KK, E, M,
    IEEE: tl.constexpr, CAST_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # heads on axis 0: CUDA caps axis 1 at 65,535, which N·H can pass
    pid = bh * tl.num_programs(1) + tl.program_id(1)
    batch = bh // H
    j, qidx, valid = _tile(TILES, OFFSETS, ORDER, pid, bh, C, L, BLOCK_M)
    if j >= C:
        return
    ce = tl.arange(0, BLOCK_E)
    cd = tl.arange(0, BLOCK_D)
    q = _tile_queries(Q, bh, qidx, valid, L, E, BLOCK_E, CAST_F32)
    kbase = K + bh * S * E  # per-head bases: the tile offsets below stay int32
    vbase = V + bh * S * M
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for kb in range(0, KK, BLOCK_N):
        t, used = _keys(TOP, KPM, bh, batch, j, kb, C, S, KK, BLOCK_N)
        k = tl.load(kbase + (t[:, None] * E + ce[None, :]), mask=(ce < E)[None, :], other=0.0)
        v = tl.load(vbase + (t[:, None] * M + cd[None, :]), mask=(cd < M)[None, :], other=0.0)
        if CAST_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE) * scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(used[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    _, qidx, valid = _tile(TILES, OFFSETS, ORDER, pid, bh, C, L, BLOCK_M)  # reloaded, not kept live across the loop
    o = acc / l_i[:, None]  # (BLOCK_M, BLOCK_D) fp32; NaN for a NaN or all-padded row
    mass = tl.load(MASS + bh * C + j)
    rest = tl.load(REST + (bh * C + j) * M + cd, mask=cd < M, other=0.0)
    out = mass * o + rest[None, :]
    where = bh * L * M + (qidx[:, None] * M + cd[None, :])
    store = valid[:, None] & (cd < M)[None, :]
    tl.store(OUT + where, out.to(OUT.dtype.element_ty), mask=store)
    tl.store(O + where, o.to(O.dtype.element_ty), mask=store)
    tl.store(LSE + bh * L + qidx, m_i + tl.log(l_i), mask=valid)


@triton.jit
def _bwd_chunk(
    TOP, KPM, kbase, vbase, q, do, lse, delta, valid, bh, batch, j, kb, scale, C, S, KK, E, M,
    IEEE: tl.constexpr, CAST_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Recompute key chunk kb of a tile: (keys, real-key mask, K chunk, P, dS), P and dS (BLOCK_M, BLOCK_N) fp32."""
    ce = tl.arange(0, BLOCK_E)
    cd = tl.arange(0, BLOCK_D)
    t, used = _keys(TOP, KPM, bh, batch, j, kb, C, S, KK, BLOCK_N)
    k = tl.load(kbase + (t[:, None] * E + ce[None, :]), mask=(ce < E)[None, :], other=0.0)
    v = tl.load(vbase + (t[:, None] * M + cd[None, :]), mask=(cd < M)[None, :], other=0.0)
    if CAST_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = _dot(q, tl.trans(k), IEEE) * scale
    p = tl.exp(s - lse[:, None])
    p = tl.where(valid[:, None] & used[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    return t, used, k, p, ds


@triton.jit
def _topk_attn_bwd(
    DOUT, Q, K, V,  # (N*H, L, M), (N*H, L, E), (N*H, S, E), (N*H, S, M)
    TOP, MASS, LSE, DELTA,  # (N*H, C, KK) i32, (N*H, C) fp32, (N*H, L) fp32, (N*H, L) fp32 = dout·O
    KPM, ORDER, OFFSETS, TILES,
    DQ, DK, DV,  # (N*H, L, E) q dtype, (N*H, S, E) fp32, (N*H, S, M) fp32 (atomic accumulators)
    scale, H, L, S, C, KK, E, M,
    IEEE: tl.constexpr, CAST_F32: tl.constexpr, SPLIT_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # heads on axis 0: CUDA caps axis 1 at 65,535, which N·H can pass
    pid = bh * tl.num_programs(1) + tl.program_id(1)
    batch = bh // H
    j, qidx, valid = _tile(TILES, OFFSETS, ORDER, pid, bh, C, L, BLOCK_M)
    if j >= C:
        return
    ce = tl.arange(0, BLOCK_E)
    cd = tl.arange(0, BLOCK_D)
    q = _tile_queries(Q, bh, qidx, valid, L, E, BLOCK_E, CAST_F32)
    mass = tl.load(MASS + bh * C + j)
    dout = tl.load(DOUT + bh * L * M + (qidx[:, None] * M + cd[None, :]), mask=valid[:, None] & (cd < M)[None, :], other=0.0)
    do = (dout.to(tl.float32) * mass).to(q.dtype)  # dO' = m̂·dout, (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + bh * L + qidx, mask=valid, other=0.0)
    delta = tl.load(DELTA + bh * L + qidx, mask=valid, other=0.0) * mass  # rowsum(dO' ⊙ O)
    kbase = K + bh * S * E  # per-head bases: the tile offsets below stay int32
    vbase = V + bh * S * M
    dq = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for kb in range(0, KK, BLOCK_N):
        t, used, k, p, ds = _bwd_chunk(
            TOP, KPM, kbase, vbase, q, do, lse, delta, valid, bh, batch, j, kb, scale, C, S, KK, E, M,
            IEEE, CAST_F32, BLOCK_N, BLOCK_E, BLOCK_D,
        )
        if not SPLIT_DQ:
            dq += _dot(ds.to(k.dtype), k, IEEE)
        key = used[:, None]
        dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)  # (BLOCK_N, BLOCK_D)
        tl.atomic_add(DV + bh * S * M + (t[:, None] * M + cd[None, :]), dv, mask=key & (cd < M)[None, :],
                      sem="relaxed")  # dV dies here, before dK is made
        dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * scale  # (BLOCK_N, BLOCK_E)
        tl.atomic_add(DK + bh * S * E + (t[:, None] * E + ce[None, :]), dk, mask=key & (ce < E)[None, :],
                      sem="relaxed")
    if SPLIT_DQ:  # a second pass for dQ: the dQ accumulator is not live beside dK/dV (no spills)
        for kb in range(0, KK, BLOCK_N):
            t, used, k, p, ds = _bwd_chunk(
                TOP, KPM, kbase, vbase, q, do, lse, delta, valid, bh, batch, j, kb, scale, C, S, KK, E, M,
                IEEE, CAST_F32, BLOCK_N, BLOCK_E, BLOCK_D,
            )
            dq += _dot(ds.to(k.dtype), k, IEEE)
    # reloaded rather than kept live across the loops (with triton 3.6 they spilled at head dim 128)
    _, qidx, valid = _tile(TILES, OFFSETS, ORDER, pid, bh, C, L, BLOCK_M)
    tl.store(
        DQ + bh * L * E + (qidx[:, None] * E + ce[None, :]),
        (dq * scale).to(DQ.dtype.element_ty),
        mask=valid[:, None] & (ce < E)[None, :],
    )


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(e: int, m: int, dtype: torch.dtype, backward: bool, interpreted: bool) -> dict:
    """The constexpr tile sizes (and SPLIT_DQ for the backward) the dispatcher chooses.

    On the GPU: tiles of 64 queries (32 in fp32, whose IEEE dots hold more registers), head dims
    padded to 64 or 128, 32 keys a step (16 in the backward at head dim 128, whose dQ then takes
    a second pass; fp32 as below). Few configurations, none spilling on sm_80 or sm_90 with triton
    3.6 or 3.9 (see CONFIGS). Under the interpreter small tiles, so that the tests' small shapes
    cross tile and key-chunk boundaries, and both backward variants run."""
    if interpreted:
        blocks = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_E": max(16, triton.next_power_of_2(e)),
                  "BLOCK_D": max(16, triton.next_power_of_2(m))}
        return {**blocks, "SPLIT_DQ": max(e, m) > 16} if backward else blocks
    head = 64 if max(e, m) <= 64 else 128
    if dtype == torch.float32:
        # keys a step: none of these spills on sm_80 / sm_90 with triton 3.6 or 3.9 (32 in the forward at
        # head dim 64 spilled on sm_90, and 16 in the backward at 64 with triton 3.6's code)
        keys = {(False, 64): 16, (False, 128): 32, (True, 64): 32, (True, 128): 16}[backward, head]
        blocks = {"BLOCK_M": 32, "BLOCK_N": keys, "BLOCK_E": head, "BLOCK_D": head}
        return {**blocks, "SPLIT_DQ": False} if backward else blocks
    if not backward:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_E": head, "BLOCK_D": head}
    return {"BLOCK_M": 64, "BLOCK_N": 16 if head == 128 else 32, "BLOCK_E": head, "BLOCK_D": head,
            "SPLIT_DQ": head == 128}


def _signature(dtype: str, backward: bool) -> dict:
    ints = {name: "i32" for name in ("H", "L", "S", "C", "KK", "E", "M")}
    table = {"KPM": "*i8", "ORDER": "*i32", "OFFSETS": "*i32", "TILES": "*i32"}
    if backward:
        return {
            "DOUT": f"*{dtype}", "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}",
            "TOP": "*i32", "MASS": "*fp32", "LSE": "*fp32", "DELTA": "*fp32", **table,
            "DQ": f"*{dtype}", "DK": "*fp32", "DV": "*fp32", "scale": "fp32", **ints,
        }
    return {
        "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "TOP": "*i32", "MASS": "*fp32", "REST": "*fp32",
        **table, "OUT": f"*{dtype}", "O": f"*{dtype}", "LSE": "*fp32", "scale": "fp32", **ints,
    }


def _num_warps(blocks: dict) -> int:
    return 8 if blocks["BLOCK_M"] >= 32 else 4


# Every GPU configuration the dispatcher chooses: forward and backward, fp16 / bf16 (tensor-core
# tiles) and fp32 (IEEE dots, no tensor cores), head dims padded to 64 or 128.
CONFIGS = [
    {
        "kernel": kernel,
        "signature": _signature(dtype, kernel is _topk_attn_bwd),
        "constexprs": {"IEEE": dtype == "fp32", "CAST_F32": False, **blocks},
        "num_warps": _num_warps(blocks),
        "tile_products": dtype != "fp32",
    }
    for kernel in (_topk_attn_fwd, _topk_attn_bwd)
    for dtype in ("fp16", "bf16", "fp32")
    for head in (64, 128)
    for blocks in (_blocks(head, head, _TORCH[dtype], kernel is _topk_attn_bwd, False),)
]


def _grid(n_tiles: int, nh: int) -> Tuple[int, int]:
    """The top-k attention's launch grid, (N·H, tiles): CUDA allows 2**31 - 1 programs on axis 0 but
    65,535 on axis 1, and N·H can pass 65,535 (70,000 short sentences, say) where the tiles a head
    (cdiv(L, BLOCK_M) + C) reach it only past L = 4M. (One axis, the head found by a division, cost
    the sm_90 forward 36 more registers.)"""
    if n_tiles > 65_535:
        raise ValueError(f"the Triton top-k attention takes at most 65,535 tiles a head (cdiv(L, BLOCK_M) + C), got "
                         f"{n_tiles}; use shorter sequences")
    return (nh, n_tiles)


def _tile_table(offsets: Tensor, block_m: int, n_tiles: int) -> Tensor:
    """(N*H, n_tiles, 2) int32: (cluster, first row in ``order``) per tile; cluster = C for a spare
    tile. Torch ops only: no host sync, fixed shape."""
    bh, c1 = offsets.shape
    c = c1 - 1
    counts = (offsets[:, 1:] - offsets[:, :-1]).long()  # (BH, C)
    per = (counts + block_m - 1) // block_m  # tiles of each cluster
    ends = per.cumsum(-1)  # (BH, C): tiles of clusters 0..j
    tile = torch.arange(n_tiles, device=offsets.device).expand(bh, n_tiles).contiguous()
    j = torch.searchsorted(ends, tile, right=True)  # (BH, T) in [0, C]
    jc = j.clamp_max(c - 1)
    first_tile = ends.gather(1, jc) - per.gather(1, jc)
    row0 = offsets.long()[:, :-1].gather(1, jc) + (tile - first_tile) * block_m
    return torch.stack((j, row0), -1).to(torch.int32).contiguous()


def group_by_cluster(assignment: Tensor, clusters: int) -> Tuple[Tensor, Tensor]:
    """``order`` (N, H, L) int32 (queries sorted by cluster, stable, assignment -1 last) and
    ``offsets`` (N, H, C+1) int32, with torch ops only (no host sync). Hamming k-means will emit
    these itself; this is the stand-in."""
    key = torch.where(assignment < 0, torch.full_like(assignment, clusters), assignment)
    sorted_key, order = torch.sort(key, dim=-1, stable=True)
    bound = torch.arange(clusters + 1, device=assignment.device, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key.contiguous(), bound.expand(*key.shape[:-1], clusters + 1).contiguous())
    return order.to(torch.int32), offsets.to(torch.int32)


def _kpm_i8(key_padding_mask: Optional[Tensor], n: int, s: int, like: Tensor) -> Tensor:
    if key_padding_mask is None:
        return torch.zeros(n, s, dtype=torch.int8, device=like.device)
    return key_padding_mask.to(torch.int8).contiguous()


def _flags(q: Tensor) -> dict:
    return {
        "IEEE": q.dtype == torch.float32,
        # The interpreter's bf16 tl.dot multiplies raw bit patterns: do it in fp32 there.
        "CAST_F32": _interpreted() and q.dtype == torch.bfloat16,
    }


@torch.library.custom_op("fairseq_clustered_triton::topk_attention", mutates_args=())
def topk_attention(
    q: Tensor, k: Tensor, v: Tensor, top: Tensor, mass: Tensor, rest: Tensor,
    order: Tensor, offsets: Tensor, key_padding_mask: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out (N,H,L,M) = m̂·O + rest, O (N,H,L,M), lse (N,H,L) fp32). Queries outside every cluster
    (assignment -1) get out = O = 0 and lse = 0."""
    n, h, length, e = q.shape
    s, m = k.shape[2], v.shape[3]
    c, kk = top.shape[2], top.shape[3]
    out = torch.zeros(n, h, length, m, dtype=q.dtype, device=q.device)
    o = torch.zeros_like(out)
    lse = torch.zeros(n, h, length, dtype=torch.float32, device=q.device)
    blocks = _blocks(e, m, q.dtype, False, _interpreted())
    n_tiles = triton.cdiv(length, blocks["BLOCK_M"]) + c
    tiles = _tile_table(offsets.reshape(n * h, c + 1), blocks["BLOCK_M"], n_tiles)
    _topk_attn_fwd[_grid(n_tiles, n * h)](
        q.contiguous(), k.contiguous(), v.contiguous(), top.contiguous(), mass.contiguous(), rest.contiguous(),
        _kpm_i8(key_padding_mask, n, s, q), order.contiguous(), offsets.contiguous(), tiles,
        out, o, lse, float(scale), h, length, s, c, kk, e, m,
        **_flags(q), **blocks, num_warps=_num_warps(blocks),
    )
    return out, o, lse


@topk_attention.register_fake
def _(q, k, v, top, mass, rest, order, offsets, key_padding_mask, scale):
    out = q.new_empty(*q.shape[:3], v.shape[3])
    return out, torch.empty_like(out), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fairseq_clustered_triton::topk_attention_backward", mutates_args=())
def topk_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, top: Tensor, mass: Tensor, lse: Tensor, delta: Tensor,
    order: Tensor, offsets: Tensor, key_padding_mask: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the O part, in the dtype of q; ``delta`` = Σ_m dout·O (N,H,L) fp32."""
    n, h, length, e = q.shape
    s, m = k.shape[2], v.shape[3]
    c, kk = top.shape[2], top.shape[3]
    dq = torch.zeros_like(q)
    dk = torch.zeros(n, h, s, e, dtype=torch.float32, device=q.device)
    dv = torch.zeros(n, h, s, m, dtype=torch.float32, device=q.device)
    blocks = _blocks(e, m, q.dtype, True, _interpreted())
    n_tiles = triton.cdiv(length, blocks["BLOCK_M"]) + c
    tiles = _tile_table(offsets.reshape(n * h, c + 1), blocks["BLOCK_M"], n_tiles)
    _topk_attn_bwd[_grid(n_tiles, n * h)](
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), top.contiguous(), mass.contiguous(),
        lse.contiguous(), delta.contiguous(), _kpm_i8(key_padding_mask, n, s, q), order.contiguous(),
        offsets.contiguous(), tiles, dq, dk, dv, float(scale), h, length, s, c, kk, e, m,
        **_flags(q), **blocks, num_warps=_num_warps(blocks),
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@topk_attention_backward.register_fake
def _(dout, q, k, v, top, mass, lse, delta, order, offsets, key_padding_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, top, mass, rest, order, offsets, key_padding_mask, scale = inputs
    _, o, lse = output
    ctx.save_for_backward(q, k, v, top, mass, order, offsets, key_padding_mask, o, lse)
    ctx.scale = scale
    ctx.clusters = top.shape[2]
    ctx.mark_non_differentiable(o, lse)


def _backward(ctx, grad_out, grad_o, grad_lse):
    q, k, v, top, mass, order, offsets, key_padding_mask, o, lse = ctx.saved_tensors
    n, h, length, m = o.shape
    c = ctx.clusters
    if grad_out is None:
        grad_out = torch.zeros_like(o)
    delta = (grad_out.float() * o.float()).sum(-1)  # (N, H, L): dout_i·O_i
    dq, dk, dv = topk_attention_backward(
        grad_out, q, k, v, top, mass, lse, delta, order, offsets, key_padding_mask, ctx.scale
    )
    # Per-cluster sums over the members: position p of ``order`` belongs to cluster
    # searchsorted(offsets, p) - 1 (C for queries outside every cluster, dropped).
    pos = torch.arange(length, device=q.device).expand(n, h, length).contiguous()
    member = torch.searchsorted(offsets[..., 1:].contiguous().long(), pos, right=True)  # (N, H, L) in [0, C]
    sorted_delta = delta.gather(-1, order.long())
    sorted_dout = grad_out.float().gather(2, order.long().unsqueeze(-1).expand(n, h, length, m))
    dmass = torch.zeros(n, h, c + 1, dtype=torch.float32, device=q.device).scatter_add_(-1, member, sorted_delta)
    drest = torch.zeros(n, h, c + 1, m, dtype=torch.float32, device=q.device).scatter_add_(
        2, member.unsqueeze(-1).expand(n, h, length, m), sorted_dout
    )
    return dq, dk, dv, None, dmass[..., :c], drest[:, :, :c], None, None, None, None


topk_attention.register_autograd(_backward, setup_context=_setup)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, centroids: Tensor, assignment: Tensor, topk: int) -> None:
    """One-line errors naming the argument, before any launch."""
    for name, t in (("q", q), ("k", k), ("v", v), ("centroids", centroids)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dimensional tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32 for the Triton kernels, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
    n, h, length, e = q.shape
    if k.shape[:2] != (n, h) or v.shape[:2] != (n, h) or k.shape[3] != e or v.shape[2] != k.shape[2]:
        raise ValueError(f"k, v must be (N, H, S, E) and (N, H, S, M) matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if centroids.shape[:2] != (n, h) or centroids.shape[3] != e:
        raise ValueError(f"centroids must be (N={n}, H={h}, C, E={e}), got {tuple(centroids.shape)}")
    if e > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"q and v head dims must be <= {MAX_HEAD_DIM} for the Triton kernels, got E={e}, M={v.shape[3]}")
    if max(length * e, k.shape[2] * max(e, v.shape[3])) >= 2**31:
        raise ValueError(f"q, k and v must each hold < 2**31 elements per head (int32 tile offsets), got {tuple(q.shape)}, {tuple(k.shape)}")
    if not isinstance(assignment, Tensor) or assignment.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"assignment must be an int32/int64 tensor, got {getattr(assignment, 'dtype', type(assignment).__name__)}")
    if tuple(assignment.shape) != (n, h, length) or assignment.device != q.device:
        raise ValueError(f"assignment must be a ({n}, {h}, {length}) tensor on {q.device}, got {tuple(assignment.shape)} on {assignment.device}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= min(k.shape[2], MAX_TOPK):
        raise ValueError(f"topk must be an int in 1..min(S={k.shape[2]}, {MAX_TOPK}) for the Triton kernels, got {topk}")


def topk_products(
    q: Tensor, k: Tensor, v: Tensor, centroids: Tensor, assignment: Tensor, topk: int, scale: float,
    key_padding_mask: Optional[Tensor] = None,
    order: Optional[Tensor] = None, offsets: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The i-clustered products on the Triton path: (m̂ (N, H, C) fp32, out (N, H, L, M)) with
    ``out_i = m̂_j Σ_{t∈T_j} softmax_t(τ q_i·k_t) v_t + Σ_{t∉T_j} A^c_jt v_t`` for query i of
    cluster j (0 for queries with assignment -1; padded queries are zeroed by the caller).
    ``topk`` <= S. ``order`` / ``offsets`` group the queries by cluster (computed here when not
    given). Differentiable in q, k, v and centroids (through A^c, m̂ and rest)."""
    check_inputs(q, k, v, centroids, assignment, topk)
    c = centroids.shape[2]
    scores = (centroids.float() * scale) @ k.float().transpose(-1, -2)  # (N, H, C, S) fp32
    rest_w, top, _, mass = softmax_topk(scores, key_padding_mask, topk)
    rest = rest_w @ v.float()  # (N, H, C, M) fp32: Σ_{t∉T_j} A^c_jt v_t without cancellation
    if order is None or offsets is None:
        order, offsets = group_by_cluster(assignment, c)
    out, _, _ = topk_attention(q, k, v, top, mass, rest, order, offsets, key_padding_mask, float(scale))
    return mass, out
