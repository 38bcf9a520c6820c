"""Tests of fairseq_plugin.ops, and the independent float64 references they compare against.

The references below are written from DESIGN.md §2 and docs/ops-api.md only (explicit loops,
hand-written softmax), never from the implementation, so that a shared mistake is unlikely.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_qkv(n, h, length, s, e, m, *, seed=0, dtype=torch.float32, requires_grad=False):
    g = gen(seed)
    q = torch.randn(n, h, length, e, generator=g, dtype=torch.float64)
    k = torch.randn(n, h, s, e, generator=g, dtype=torch.float64)
    v = torch.randn(n, h, s, m, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))


def padding_mask(lengths: Sequence[int], total: int, left: Sequence[bool] = ()) -> Tensor:
    """(N, total) bool, True = padded; row r keeps lengths[r] real positions (right padding, or left
    padding where left[r] is True)."""
    mask = torch.ones(len(lengths), total, dtype=torch.bool)
    for r, n_real in enumerate(lengths):
        if r < len(left) and left[r]:
            mask[r, total - n_real:] = False
        else:
            mask[r, :n_real] = False
    return mask


def rel_err(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| / max |ref| (computed in float64)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def hand_softmax(scores: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
    """Softmax over the last axis, written out; entries where allowed is False get weight 0."""
    if allowed is not None:
        scores = torch.where(allowed, scores, torch.full_like(scores, -math.inf))
    shifted = scores - scores.max(dim=-1, keepdim=True).values
    ex = torch.exp(shifted)
    return ex / ex.sum(dim=-1, keepdim=True)


def ref_full(q, k, v, *, tau=None, key_padding_mask=None, query_padding_mask=None) -> Tensor:
    """softmax(τ Q Kᵀ + mask) V in float64, padded query rows zero."""
    q, k, v = q.double(), k.double(), v.double()
    tau = 1.0 / math.sqrt(q.shape[-1]) if tau is None else tau
    scores = tau * torch.einsum("nhle,nhse->nhls", q, k)
    allowed = None
    if key_padding_mask is not None:
        allowed = (~key_padding_mask)[:, None, None, :].expand_as(scores)
    out = torch.einsum("nhls,nhsm->nhlm", hand_softmax(scores, allowed), v)
    if query_padding_mask is not None:
        out = out * (~query_padding_mask)[:, None, :, None].to(out.dtype)
    return out


def ref_clustered_from_assignment(q, k, v, assignment, n_clusters, *, topk=None, tau=None,
                                  key_padding_mask=None, query_padding_mask=None, detach_mhat=False):
    """(Improved-)clustered attention for a GIVEN assignment (N, H, L), per DESIGN.md §2.

    Returns (out (N,H,L,M), mhat (N,H,C) or None). Differentiable w.r.t. q, k, v (the assignment
    and the top-k sets are held fixed, as they are piecewise constant). Dtype follows the inputs.
    detach_mhat=True reproduces the reference library's defect (m̂ treated as a constant in backward).
    """
    n, h, length, e = q.shape
    s = k.shape[2]
    tau = 1.0 / math.sqrt(e) if tau is None else tau
    rows = {}
    mhat = torch.zeros(n, h, n_clusters, dtype=q.dtype)
    for b in range(n):
        real_keys = torch.ones(s, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask[b]
        for hh in range(h):
            for j in range(n_clusters):
                members = (assignment[b, hh] == j).nonzero().flatten().tolist()
                if not members:
                    continue
                qc = torch.stack([q[b, hh, i] for i in members]).mean(0)
                ac = hand_softmax(tau * (k[b, hh] @ qc), real_keys)  # (S,)
                if topk is None:
                    for i in members:
                        rows[(b, hh, i)] = ac @ v[b, hh]
                    continue
                kk = min(topk, s)
                rank = torch.where(real_keys, ac.detach(), torch.full_like(ac.detach(), -1.0))
                top = torch.argsort(rank, descending=True, stable=True)[:kk]
                in_top = torch.zeros(s, dtype=torch.bool)
                in_top[top] = True
                m_j = (ac * in_top.to(ac.dtype)).sum()
                mhat[b, hh, j] = m_j.detach()
                if detach_mhat:
                    m_j = m_j.detach()
                rest = (ac * (~in_top).to(ac.dtype)) @ v[b, hh]
                for i in members:
                    w = hand_softmax(tau * (k[b, hh] @ q[b, hh, i]), in_top & real_keys)
                    rows[(b, hh, i)] = m_j * (w @ v[b, hh]) + rest
    zero = torch.zeros(v.shape[-1], dtype=v.dtype)
    out = torch.stack([
        torch.stack([
            torch.stack([
                zero if (query_padding_mask is not None and bool(query_padding_mask[b, i])) else rows[(b, hh, i)]
                for i in range(length)
            ]) for hh in range(h)
        ]) for b in range(n)
    ])
    return out, (mhat if topk is not None else None)


def ref_hardmax_sets(q, k, A=None, tie_tolerance=0.0, key_padding_mask=None):
    """Bool (N, H, L, S): C_i = {j : q_iᵀ A k_j >= max_j - tol}, over real keys, in float64."""
    q, k = q.double(), k.double()
    if A is not None:
        q = torch.einsum("nhle,ef->nhlf", q, A.double())
    scores = torch.einsum("nhle,nhse->nhls", q, k)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    best = scores.max(dim=-1, keepdim=True).values
    return scores >= best - tie_tolerance


def ref_hardmax(q, k, v, *, A=None, alpha=None, tie_tolerance=0.0, key_padding_mask=None, query_padding_mask=None):
    sets = ref_hardmax_sets(q, k, A, tie_tolerance, key_padding_mask).double()
    attn = (sets / sets.sum(-1, keepdim=True)) @ v.double()
    out = attn if alpha is None else (v.double() + alpha * attn) / (1 + alpha)
    if query_padding_mask is not None:
        out = out * (~query_padding_mask)[:, None, :, None].double()
    return out


def strict_leaders(z: Tensor, A: Optional[Tensor] = None) -> Tensor:
    """For points z (..., T, d): True where <A z_i, z_i> > <A z_i, z_j> for every j != i."""
    z = z.double()
    az = z if A is None else z @ A.double()
    s = az @ z.transpose(-1, -2)
    diag = s.diagonal(dim1=-2, dim2=-1)
    off = s.clone()
    off.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    return diag > off.max(dim=-1).values


def hardmax_layer_ref(z: Tensor, A: Optional[Tensor], alpha: float) -> Tensor:
    """One layer z <- (z + alpha * mean_{C_i} z) / (1 + alpha) on (..., T, d) float64."""
    sets = ref_hardmax_sets(z, z, A).double()
    return (z + alpha * (sets / sets.sum(-1, keepdim=True)) @ z) / (1 + alpha)
