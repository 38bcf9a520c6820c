"""Hardmax attention (Alcalde, Fantuzzi, Zuazua 2024), the PyTorch reference (DESIGN.md §2).

Scores s_ij = <A q_i, k_j> with A symmetric positive definite (identity by default). Exact
hardmax attends uniformly to the attention set C_i = argmax_j s_ij (all maximisers, within
``tie_tolerance``); the low-temperature softmax softmax(s / T), computed in float32 or wider,
is its differentiable stand-in for training. With ``alpha`` the function is the paper's whole
layer, z_i <- (z_i + alpha * mean_{j in C_i} z_j) / (1 + alpha), where z_i is the value v_i.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .checks import check_masks, check_qkv
from .options import check, default


class HardmaxInfo(NamedTuple):
    leaders: Tensor  # (N, H, L) bool: query i is in its own attention set (False for padding)
    set_size: Tensor  # (N, H, L) int64: size of the exact attention set C_i (0 for padding)


def _check_qk_matrix(qk_matrix: Optional[Tensor], q: Tensor) -> None:
    if qk_matrix is None:
        return
    e = q.shape[-1]
    if not isinstance(qk_matrix, Tensor):
        raise TypeError(f"qk_matrix must be a torch.Tensor (E, E) or None, got {type(qk_matrix).__name__}")
    if tuple(qk_matrix.shape) != (e, e):
        raise ValueError(f"qk_matrix must have shape {(e, e)} (E, E), got {tuple(qk_matrix.shape)}")
    if qk_matrix.dtype != q.dtype:
        raise TypeError(f"qk_matrix must have the dtype of q ({q.dtype}), got {qk_matrix.dtype}")
    if qk_matrix.device != q.device:
        raise ValueError(f"qk_matrix must be on {q.device}, got {qk_matrix.device}")


def hardmax_scores(q: Tensor, k: Tensor, qk_matrix: Optional[Tensor]) -> Tensor:
    """<A q_i, k_j> as (N, H, L, S) in at least float32 (scores / T overflow half precision)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(compute), k.to(compute)
    if qk_matrix is not None:
        q = q @ qk_matrix.to(compute)  # A symmetric: (A q)ᵀ = qᵀ A
    return q @ k.transpose(-1, -2)


def hardmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    alpha: Optional[float] = default("alpha"),
    qk_matrix: Optional[Tensor] = None,
    temperature: Optional[float] = default("temperature"),
    tie_tolerance: float = default("tie_tolerance"),
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    return_leaders: bool = False,
) -> Union[Tensor, Tuple[Tensor, HardmaxInfo]]:
    """Hardmax attention, (N, H, L, M); with ``return_leaders`` also a :class:`HardmaxInfo`.

    ``temperature=None`` is the exact hardmax (differentiable in v only; the attention set is
    piecewise constant in q, k and A); a temperature T > 0 gives softmax(s / T). ``alpha`` and
    ``return_leaders`` need self-attention shapes (L == S); the residual term of ``alpha`` is v_i.
    """
    check_qkv(q, k, v)
    check_masks(q, k, key_padding_mask, query_padding_mask)
    for name, value in (("alpha", alpha), ("temperature", temperature), ("tie_tolerance", tie_tolerance)):
        check(name, value)
    _check_qk_matrix(qk_matrix, q)
    length, s = q.shape[2], k.shape[2]
    if (alpha is not None or return_leaders) and length != s:
        raise ValueError(
            f"alpha and return_leaders need self-attention (L == S), got L={length}, S={s}"
        )

    scores = hardmax_scores(q, k, qk_matrix)  # (N, H, L, S)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    need_set = temperature is None or return_leaders
    if need_set:
        with torch.no_grad():
            best = scores.amax(-1, keepdim=True)  # (N, H, L, 1)
            in_set = scores >= best - tie_tolerance  # (N, H, L, S)
    if temperature is None:
        weights = in_set.to(scores.dtype)
        weights = weights / weights.sum(-1, keepdim=True)
    else:
        weights = torch.softmax(scores / temperature, dim=-1)
    out = weights.to(v.dtype) @ v  # (N, H, L, M)
    if alpha is not None:
        out = (v + alpha * out) / (1 + alpha)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[:, None, :, None], 0.0)
    if not return_leaders:
        return out

    leaders = in_set.diagonal(dim1=-2, dim2=-1)  # (N, H, L)
    set_size = in_set.sum(-1)
    if query_padding_mask is not None:
        padded = query_padding_mask[:, None, :]
        leaders = leaders & ~padded
        set_size = set_size.masked_fill(padded, 0)
    return out, HardmaxInfo(leaders, set_size)
