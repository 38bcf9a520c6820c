"""Centroid attention + per-cluster top-k in one fused Triton kernel per row (DESIGN.md §2).

``softmax_topk(scores, key_padding_mask, topk)`` takes the centroid scores τ·Q_c Kᵀ in float32
(N, H, C, S) (a GEMM, left to torch) and returns, per cluster row j:

* ``rest_weights`` (N, H, C, S) fp32: A^c_j with its top-k entries zeroed (the weights of
  ``rest_j = Σ_{t∉T_j} A^c_jt v_t``, which the caller multiplies by V in fp32: no cancellation);
* ``top`` (N, H, C, k) int32: the top-k keys, by weight descending, ties to the lowest key index,
  padded keys ranked below every real key (they fill the set when k exceeds the real keys, with
  weight 0). Always in [0, S), whatever the scores hold;
* ``top_weights`` (N, H, C, k) fp32: A^c_jt for t in T_j;
* ``mass`` (N, H, C) fp32: m̂_j = Σ_{t∈T_j} A^c_jt.

A NaN or +inf score, or a row whose keys are all padded, makes every weight of that row NaN.
Gradients flow to ``scores`` from ``rest_weights``, ``top_weights`` and ``mass``: the softmax
backward ``dscores = A^c ⊙ (g - Σ g ⊙ A^c)``, where g is the rest weights' gradient off T_j and the
top weights' (plus the mass's) on T_j. It is a second kernel, one program a row: pass 1 reads
``rest_weights`` and its gradient for the row's dot product (the top-k part from the (k,) lists),
pass 2 reads them again and writes ``dscores``, then the k entries of T_j are written over. That
reads 3 and writes 1 (C, S) fp32 arrays, with no temporary, against about 8 reads and 5 writes, and
4 temporaries, as torch ops. A non-finite rest-weights gradient at a key of T_j (where the rest
weight is a constant 0) makes the row's gradient NaN, where the torch form ignored it.

The kernel: one program per row. Pass 1 reads the row in chunks of BLOCK_S for its max and sum
(per-lane online softmax). Pass 2 computes the weights and writes them. The top-k keys are then
chosen in one of two ways:

* **Threshold (k <= 128).** The k-th largest of the BLOCK_S lane maxima bounds the row's k-th
  largest score from below. Pass 2 appends every key weighing at least that much to a scratch
  list, by a prefix sum. When there are k to CAP = 4·BLOCK_K of them, one sort of the list gives the
  top-k, since every key of the top-k is on it.
* **Chunk merge.** Otherwise (k > 128; ties or a pattern that puts more than CAP keys above the
  bound; NaN rows; fewer real keys than k), a running top-k list over the row is used:
  - each chunk's best BLOCK_K keys are merged in by a bitonic ``tl.sort`` on int64 keys that pack
    the weight's bits above the key index, so one sort orders by weight, then by index;
  - a chunk whose best key does not beat the list's last is skipped.

At 16k iid keys and k = 32 the merge sorted 43.5 of the 64 chunks. The threshold keeps 32-40 keys:
static SASS (sm_90) of about 21k instructions a thread a row, against about 54k for the merge.
Pass 3 zeroes the top-k entries of the written row. ``PATH`` records which way each row went.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_TOPK = 512  # the running top-k list is one sorted block of int64 keys
# Sort keys: the low 32 bits hold _IDX_BASE - index (lower index = larger key), the high 32 bits
# the weight's bits for a real key (>= 0), or one of these below it (constexpr: kernels read them).
_IDX_BASE = tl.constexpr(2**31 - 1)
_PADDED = tl.constexpr(-1)  # a padded key
_OUTSIDE = tl.constexpr(-2)  # a lane past S
_EMPTY_KEY = tl.constexpr(-3 << 32)  # an unfilled slot of the running list
_NO_KEY = tl.constexpr(-4 << 32)  # below everything


@triton.jit
def _head(x, N: tl.constexpr, K: tl.constexpr):
    """The first K entries of a (N,) int64 block (N a multiple of K)."""
    x2 = tl.reshape(x, (N // K, K))
    first = (tl.arange(0, N // K) == 0)[:, None]
    return tl.max(tl.where(first, x2, _NO_KEY), axis=0)


@triton.jit
def _row_scores(scores, KPM, batch, S, idx, inside):
    """(a chunk of a row's scores, -inf at padded keys and past the end; which keys are padded)."""
    s = tl.load(scores + idx, mask=inside, other=float("-inf"))
    padded = tl.load(KPM + batch * S + idx, mask=inside, other=1) != 0
    return tl.where(padded, float("-inf"), s), padded


@triton.jit
def _merge_chunks(scores, KPM, batch, S, max_safe, row_sum, lanes, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row's top BLOCK_K keys by a running list: each chunk's best BLOCK_K keys, found by a
    bitonic sort, are merged in by another; a chunk whose best key does not beat the list's last
    is skipped."""
    best = tl.full((BLOCK_K,), _EMPTY_KEY, tl.int64)
    for start in range(0, S, BLOCK_S):
        idx = start + lanes
        inside = idx < S
        s, padded = _row_scores(scores, KPM, batch, S, idx, inside)
        key = _sort_key(tl.exp(s - max_safe) / row_sum, padded, inside, idx)
        if tl.max(key, axis=0) > tl.min(best, axis=0):  # keys are distinct: else none can enter
            chunk = _head(tl.sort(key, descending=True), BLOCK_S, BLOCK_K)
            merged = tl.reshape(tl.join(best, chunk), (2 * BLOCK_K,))
            best = _head(tl.sort(merged, descending=True), 2 * BLOCK_K, BLOCK_K)
    return best


@triton.jit
def _weight_bits(w):
    return tl.where(w > 0, w.to(tl.int32, bitcast=True), 0)  # monotonic in w for w >= 0; NaN -> 0


@triton.jit
def _sort_key(w, padded, inside, idx):
    """int64 keys that order by weight, then by lower index; padded keys below every real one."""
    high = tl.where(inside, tl.where(padded, _PADDED, _weight_bits(w)), _OUTSIDE)
    return high.to(tl.int64) * (1 << 32) + (idx * -1 + _IDX_BASE).to(tl.int64)


@triton.jit
def _softmax_topk_kernel(
    SCORES,  # (R, S) fp32, R = N*H*C rows
    KPM,  # (N, S) int8, 1 = padded (all zeros without a mask: one config, one byte a key)
    REST_W,  # (R, S) fp32 out: weights with the top-k zeroed
    TOP,  # (R, KK) int32 out
    TOP_W,  # (R, KK) fp32 out
    MASS,  # (R,) fp32 out
    CAND,  # (R, CAP) int64 scratch: the row's candidate keys (THRESHOLD)
    PATH,  # (R,) int8 out: 1 where the threshold's candidates gave the top-k, 0 where the chunk merge did
    S,
    KK,
    ROWS_PER_BATCH,  # H*C: row r belongs to batch r // (H*C)
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    THRESHOLD: tl.constexpr,
    CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    batch = row // ROWS_PER_BATCH
    scores = SCORES + row * S
    lanes = tl.arange(0, BLOCK_S)

    # Pass 1: per-lane running max and sum, masked lanes at -inf (a guard keeps -inf - -inf out).
    m_vec = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    l_vec = tl.zeros((BLOCK_S,), tl.float32)
    for start in range(0, S, BLOCK_S):
        idx = start + lanes
        inside = idx < S
        s, padded = _row_scores(scores, KPM, batch, S, idx, inside)
        m_new = tl.maximum(m_vec, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_vec = l_vec * tl.exp(m_vec - m_safe) + tl.exp(s - m_safe)
        m_vec = m_new
    row_max = tl.max(m_vec, axis=0)
    max_safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.sum(l_vec * tl.exp(m_vec - max_safe), axis=0)  # 0 for an all-padded row -> NaN weights

    # Pass 2: the weights, written out. With THRESHOLD, also the candidates: the KK largest lane
    # maxima are KK keys of the row, so the row's KK-th largest score is at least the KK-th largest
    # lane maximum t, and every key of the top-k weighs at least w(t). The keys weighing that much
    # are appended to CAND (in index order, by a prefix sum), usually about KK of them.
    count = 0
    if THRESHOLD:
        t = tl.max(tl.where(lanes == KK - 1, tl.sort(m_vec, descending=True), float("-inf")), axis=0)
        t_bits = _weight_bits(tl.exp(t - max_safe) / row_sum)
    for start in range(0, S, BLOCK_S):
        idx = start + lanes
        inside = idx < S
        s, padded = _row_scores(scores, KPM, batch, S, idx, inside)
        w = tl.exp(s - max_safe) / row_sum
        tl.store(REST_W + row * S + idx, w, mask=inside)
        if THRESHOLD:
            cand = inside & (padded == 0) & (_weight_bits(w) >= t_bits)
            pos = count + tl.cumsum(cand.to(tl.int32), axis=0) - 1
            tl.store(CAND + row * CAP + pos, _sort_key(w, padded, inside, idx), mask=cand & (pos < CAP))
            count += tl.sum(cand.to(tl.int32), axis=0)

    # The top-k: one sort of the candidates when there are KK..CAP of them (then each key of the
    # top-k is one: at least KK real keys weigh >= w(t)). Otherwise (no THRESHOLD, ties or a
    # pattern that fills CAP, NaN, fewer real keys than KK) the chunk merge over the whole row.
    if (count >= KK) & (count <= CAP):
        tl.debug_barrier()  # the other threads' CAND stores
        slots = tl.arange(0, CAP)
        cand_keys = tl.load(CAND + row * CAP + slots, mask=slots < count, other=_NO_KEY)
        best = _head(tl.sort(cand_keys, descending=True), CAP, BLOCK_K)
        tl.store(PATH + row, 1)
    else:
        best = _merge_chunks(scores, KPM, batch, S, max_safe, row_sum, lanes, BLOCK_S, BLOCK_K)
        tl.store(PATH + row, 0)

    # Decode: index from the low 32 bits, clamped into [0, S) whatever the scores held.
    low = best - ((best >> 32) << 32)
    top = tl.minimum(tl.maximum(low * -1 + _IDX_BASE, 0), S - 1)
    slot = tl.arange(0, BLOCK_K)
    used = slot < KK
    s = tl.load(scores + top, mask=used, other=float("-inf"))
    s = tl.where(tl.load(KPM + batch * S + top, mask=used, other=1) != 0, float("-inf"), s)
    w = tl.where(used, tl.exp(s - max_safe) / row_sum, 0.0)
    tl.store(TOP + row * KK + slot, top.to(tl.int32), mask=used)
    tl.store(TOP_W + row * KK + slot, w, mask=used)
    tl.store(MASS + row, tl.sum(w, axis=0))

    # Pass 3: zero the top-k entries of the written row (after every thread's pass-2 stores).
    tl.debug_barrier()
    tl.store(REST_W + row * S + top, tl.zeros((BLOCK_K,), tl.float32), mask=used)


_GPU_BLOCK_K = (32, 128, 512)  # few configs: each is a bitonic sort network, slow to compile


def _blocks(kk: int, interpreted: bool) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_K). On the GPU BLOCK_K is the smallest of _GPU_BLOCK_K that holds k and
    chunks are 256 keys (or BLOCK_K); under the interpreter both are small, so that the tests'
    small shapes go through several chunk merges."""
    if interpreted:
        block_k = max(16, triton.next_power_of_2(kk))
        return max(64, block_k), block_k
    block_k = next(b for b in _GPU_BLOCK_K if b >= kk)
    return max(256, block_k), block_k


@triton.jit
def _softmax_topk_backward_kernel(
    REST_W,  # (R, S) fp32: the forward's rest weights (0 on T)
    GRAD_REST,  # (R, S) fp32: their gradient
    TOP,  # (R, KK) int32: T, distinct keys in [0, S)
    TOP_W,  # (R, KK) fp32: A^c on T
    G_TOP,  # (R, KK) fp32: the gradient on T (top weights' + mass's)
    GRAD,  # (R, S) fp32 out: d scores
    S,
    KK,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_S)
    slot = tl.arange(0, BLOCK_K)
    used = slot < KK
    top = tl.load(TOP + row * KK + slot, mask=used, other=0)
    top_w = tl.load(TOP_W + row * KK + slot, mask=used, other=0.0)
    g_top = tl.load(G_TOP + row * KK + slot, mask=used, other=0.0)

    # Pass 1: dot = Σ_j A^c_j g_j (off T the rest weights, on T the top weights; rest weights are 0 on T)
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for start in range(0, S, BLOCK_S):
        idx = start + lanes
        inside = idx < S
        w = tl.load(REST_W + row * S + idx, mask=inside, other=0.0)
        g = tl.load(GRAD_REST + row * S + idx, mask=inside, other=0.0)
        acc += w * g
    dot = tl.sum(acc, axis=0) + tl.sum(top_w * g_top, axis=0)

    # Pass 2: A^c_j (g_j - dot) off T (0 at padded keys, NaN through a NaN row) ...
    for start in range(0, S, BLOCK_S):
        idx = start + lanes
        inside = idx < S
        w = tl.load(REST_W + row * S + idx, mask=inside, other=0.0)
        g = tl.load(GRAD_REST + row * S + idx, mask=inside, other=0.0)
        tl.store(GRAD + row * S + idx, w * (g - dot), mask=inside)
    # ... then on T, over pass 2's zeros there (after every thread's pass-2 stores)
    tl.debug_barrier()
    tl.store(GRAD + row * S + top, top_w * (g_top - dot), mask=used)


def _backward_block_s(interpreted: bool) -> int:
    """Keys a step of the backward: 1024 on the GPU (8 a thread at 4 warps, 16-byte loads); 64
    under the interpreter, so that the tests' rows cross chunks."""
    return 64 if interpreted else 1024


def _num_warps(block_s: int) -> int:
    return 8 if block_s >= 512 else 4  # 4 warps spill a few bytes at 512


def _threshold(block_k: int) -> Tuple[bool, int]:
    """(THRESHOLD, CAP): the candidates' path for k <= 128, with room for 4·BLOCK_K candidates (the
    bound kept 32-40 keys for k = 32 and 130-210 for k = 128 in simulations of 16k keys, iid and
    local). Above 128 (BLOCK_K = 512, 512 lanes) the k-th lane maximum bounds little and 4·BLOCK_K
    keys would be a large sort: the chunk merge only."""
    return (True, 4 * block_k) if block_k <= 128 else (False, block_k)


def _signature() -> dict:
    return {
        "SCORES": "*fp32", "KPM": "*i8", "REST_W": "*fp32", "TOP": "*i32", "TOP_W": "*fp32", "MASS": "*fp32",
        "CAND": "*i64", "PATH": "*i8", "S": "i32", "KK": "i32", "ROWS_PER_BATCH": "i32",
    }


# Every (constexpr) configuration the dispatcher chooses on the GPU (one per entry of _GPU_BLOCK_K).
CONFIGS = [
    {
        "kernel": _softmax_topk_kernel,
        "signature": _signature(),
        "constexprs": {"BLOCK_S": _blocks(bk, False)[0], "BLOCK_K": bk, "THRESHOLD": _threshold(bk)[0],
                       "CAP": _threshold(bk)[1]},
        "num_warps": _num_warps(_blocks(bk, False)[0]),
        "tile_products": False,
    }
    for bk in _GPU_BLOCK_K
] + [
    {
        "kernel": _softmax_topk_backward_kernel,
        "signature": {"REST_W": "*fp32", "GRAD_REST": "*fp32", "TOP": "*i32", "TOP_W": "*fp32", "G_TOP": "*fp32",
                      "GRAD": "*fp32", "S": "i32", "KK": "i32"},
        "constexprs": {"BLOCK_S": _backward_block_s(False), "BLOCK_K": bk},
        "num_warps": 4,
        "tile_products": False,
    }
    for bk in _GPU_BLOCK_K
]


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def check_inputs(scores: Tensor, key_padding_mask: Optional[Tensor], topk: int) -> None:
    """One-line errors naming the argument, before any launch."""
    if not isinstance(scores, Tensor) or scores.dim() != 4:
        raise ValueError(f"scores must be a 4-dimensional (N, H, C, S) tensor, got {getattr(scores, 'shape', scores)}")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32 (the centroid GEMM accumulates in fp32), got {scores.dtype}")
    s = scores.shape[3]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= min(s, MAX_TOPK):
        raise ValueError(f"topk must be an int in 1..min(S={s}, {MAX_TOPK}) for the Triton kernels, got {topk}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor, got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (scores.shape[0], s):
            raise ValueError(f"key_padding_mask must have shape {(scores.shape[0], s)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != scores.device:
            raise ValueError(f"key_padding_mask must be on {scores.device}, got {key_padding_mask.device}")


@torch.library.custom_op("fairseq_clustered_triton::softmax_topk", mutates_args=())
def softmax_topk(
    scores: Tensor, key_padding_mask: Optional[Tensor], topk: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rest_weights (N,H,C,S) fp32, top (N,H,C,k) int32, top_weights (N,H,C,k) fp32, mass (N,H,C) fp32)."""
    check_inputs(scores, key_padding_mask, topk)
    if key_padding_mask is None:
        kpm = torch.zeros(scores.shape[0], scores.shape[3], dtype=torch.int8, device=scores.device)
    else:
        kpm = key_padding_mask.to(torch.int8).contiguous()
    return _launch(scores.contiguous(), kpm, topk)[:4]


def _launch(
    scores: Tensor, kpm: Tensor, topk: int, threshold: Optional[bool] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel on contiguous scores (N, H, C, S) fp32 and kpm (N, S) int8: softmax_topk's four
    outputs and ``path`` (N, H, C) int8, which way each row went (1: the threshold's candidates,
    0: the chunk merge). ``threshold=False`` forces the chunk merge everywhere (tests/ops/gpu_checks.py
    compares and times the two)."""
    n, h, c, s = scores.shape
    rest_w = torch.empty_like(scores)
    top = torch.empty(n, h, c, topk, dtype=torch.int32, device=scores.device)
    top_w = torch.empty(n, h, c, topk, dtype=torch.float32, device=scores.device)
    mass = torch.empty(n, h, c, dtype=torch.float32, device=scores.device)
    path = torch.empty(n, h, c, dtype=torch.int8, device=scores.device)
    if n * h * c == 0:
        return rest_w, top, top_w, mass, path
    block_s, block_k = _blocks(topk, _interpreted())
    default, cap = _threshold(block_k)
    threshold = default if threshold is None else threshold and default
    cand = torch.empty(n * h * c, cap if threshold else 1, dtype=torch.int64, device=scores.device)
    _softmax_topk_kernel[(n * h * c,)](
        scores, kpm, rest_w, top, top_w, mass, cand, path, s, topk, h * c,
        BLOCK_S=block_s, BLOCK_K=block_k, THRESHOLD=threshold, CAP=cap, num_warps=_num_warps(block_s),
    )
    return rest_w, top, top_w, mass, path


@softmax_topk.register_fake
def _(scores, key_padding_mask, topk):
    n, h, c, s = scores.shape
    return (
        torch.empty_like(scores),
        scores.new_empty(n, h, c, topk, dtype=torch.int32),
        scores.new_empty(n, h, c, topk),
        scores.new_empty(n, h, c),
    )


def _setup(ctx, inputs, output):
    rest_w, top, top_w, _ = output
    ctx.save_for_backward(rest_w, top, top_w)
    ctx.mark_non_differentiable(top)


@torch.library.custom_op("fairseq_clustered_triton::softmax_topk_backward", mutates_args=())
def softmax_topk_backward(rest_w: Tensor, grad_rest_w: Tensor, top: Tensor, top_w: Tensor, g_top: Tensor) -> Tensor:
    """d scores (N, H, C, S) fp32 = A^c ⊙ (g - Σ g ⊙ A^c), g the rest weights' gradient off T and
    ``g_top`` on T (A^c: ``rest_w`` with ``top_w`` on T). NaN weights (a NaN row) spread NaN to the
    row's padded positions too; those scores are masked anyway."""
    n, h, c, s = rest_w.shape
    grad = torch.empty_like(rest_w)
    kk = top.shape[-1]
    if n * h * c == 0:
        return grad
    interpreted = _interpreted()
    _softmax_topk_backward_kernel[(n * h * c,)](
        rest_w, grad_rest_w, top, top_w, g_top, grad, s, kk,
        BLOCK_S=_backward_block_s(interpreted), BLOCK_K=_blocks(kk, interpreted)[1], num_warps=4,
    )
    return grad


@softmax_topk_backward.register_fake
def _(rest_w, grad_rest_w, top, top_w, g_top):
    return torch.empty_like(rest_w)


def _backward(ctx, grad_rest_w, grad_top, grad_top_w, grad_mass):
    rest_w, top, top_w = ctx.saved_tensors
    g_top = torch.zeros_like(top_w) if grad_top_w is None else grad_top_w.float()
    if grad_mass is not None:
        g_top = g_top + grad_mass.float().unsqueeze(-1)
    g_rest = torch.zeros_like(rest_w) if grad_rest_w is None else grad_rest_w.float()
    grad = softmax_topk_backward(rest_w, g_rest.contiguous(), top, top_w, g_top.contiguous())
    return grad, None, None


softmax_topk.register_autograd(_backward, setup_context=_setup)
