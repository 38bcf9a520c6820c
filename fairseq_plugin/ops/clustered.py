"""Full, clustered and improved-clustered attention (DESIGN.md §2).

Each step has its PyTorch reference here, side by side with the compiled operator of csrc/ that
replaces it when :func:`compiled.usable` says so (see :mod:`.compiled`): the references define the
semantics every kernel is tested against, and are the fallback when no kernel is available. The
clustered paths never materialise an (L, S) tensor: clustered attention is O(C·S) in memory,
improved-clustered O(C·S + L·k) (the compiled path; the reference gathers L·k·E keys).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compiled
from .backend import implementation
from .checks import check_clustering, check_generator, check_masks, check_qkv
from .hashing import draw_planes, lsh_hash
from .kmeans import _one_hot, hamming_kmeans
from .options import check, default


class ClusterInfo(NamedTuple):
    """How the queries were clustered, for statistics and tests."""

    assignment: Tensor  # (N, H, L) int64 cluster of each query; -1 for padded queries
    counts: Tensor  # (N, H, C) int64 members per cluster
    topk_mass: Optional[Tensor]  # (N, H, C) m̂: attention mass of each cluster's top-k keys (i-clustered)
    clusters: int  # the effective number of clusters, min(clusters, L)


def _scale(softmax_temp: Optional[float], dim: int) -> float:
    return 1.0 / math.sqrt(dim) if softmax_temp is None else float(softmax_temp)


def _zero_padded_queries(out: Tensor, query_padding_mask: Optional[Tensor]) -> Tensor:
    if query_padding_mask is None:
        return out
    return out.masked_fill(query_padding_mask[:, None, :, None], 0.0)


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will record this call (the compiled CPU path keeps what a backward needs only then)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _softmax(scores: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """Row softmax over the last axis (keys) in at least float32, padded keys excluded."""
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_temp: Optional[float] = default("softmax_temp"),
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Exact softmax attention: softmax(τ Q Kᵀ + mask) V, (N, H, L, M). Uses PyTorch's SDPA."""
    check_qkv(q, k, v)
    check_masks(q, k, key_padding_mask, query_padding_mask)
    check("softmax_temp", softmax_temp)
    attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=_scale(softmax_temp, q.shape[-1]))
    return _zero_padded_queries(out, query_padding_mask)


class _Clusters(NamedTuple):
    assignment: Tensor  # (N, H, L) int64, -1 for padded queries
    counts: Tensor  # (N, H, C) int64
    centroids: Tensor  # (N, H, C, E)
    order: Optional[Tensor] = None  # (N, H, L) int32 queries grouped by cluster (Triton path: from k-means)
    offsets: Optional[Tensor] = None  # (N, H, C + 1) int32


def _cluster_queries(
    q: Tensor,
    clusters: int,
    hash_bits: int,
    iterations: int,
    hash_bias: bool,
    query_padding_mask: Optional[Tensor],
    generator: Optional[torch.Generator],
) -> _Clusters:
    """Hash, cluster and average the queries. On the Triton path k-means also emits the grouping
    of the queries by cluster (a counting sort), which the top-k attention tiles consume."""
    planes = draw_planes(hash_bits, q.shape[-1], hash_bias, generator, q.device)
    codes = lsh_hash(q.detach(), planes)  # (N, H, L)
    if implementation(q) == "triton":
        from .triton import aggregate  # imports triton: only on this path

        assignment, counts, order, offsets = hamming_kmeans(
            codes, hash_bits, clusters, iterations, query_padding_mask, generator, return_order=True
        )
        sums = aggregate.cluster_sum(q, assignment, counts.shape[-1])  # (N, H, C, E) float32
        centroids = (sums / counts.clamp_min(1).unsqueeze(-1)).to(q.dtype)
        return _Clusters(assignment, counts, centroids, order, offsets)
    assignment, counts = hamming_kmeans(codes, hash_bits, clusters, iterations, query_padding_mask, generator)
    if compiled.usable(q):
        sums = torch.ops.fairseq_clustered.cluster_sum(q, assignment, counts.shape[-1])  # (N, H, C, E)
    else:
        members = _one_hot(assignment, counts.shape[-1], q.dtype)  # (N, H, L, C)
        sums = members.transpose(-1, -2) @ q  # (N, H, C, E); gradients reach every member query
    centroids = sums / counts.clamp_min(1).unsqueeze(-1).to(q.dtype)
    return _Clusters(assignment, counts, centroids)


def _broadcast(per_cluster: Tensor, assignment: Tensor) -> Tensor:
    """Give each query its cluster's row: (N, H, C, M) -> (N, H, L, M) (padded queries: row 0 in
    the reference, zeros compiled; both are zeroed afterwards)."""
    if implementation(per_cluster) == "triton":
        from .triton import aggregate

        return aggregate.cluster_broadcast(per_cluster, assignment)
    if compiled.usable(per_cluster):
        return torch.ops.fairseq_clustered.cluster_broadcast(per_cluster, assignment)
    index = assignment.clamp_min(0).unsqueeze(-1).expand(*assignment.shape, per_cluster.shape[-1])
    return per_cluster.gather(2, index)


def _validate(q, k, v, clusters, hash_bits, iterations, hash_bias, softmax_temp, key_padding_mask, query_padding_mask,
              generator):  # fmt: skip
    check_qkv(q, k, v)
    check_masks(q, k, key_padding_mask, query_padding_mask)
    check_clustering(clusters, hash_bits, iterations, hash_bias)
    check("softmax_temp", softmax_temp)
    check_generator(generator, q.device)


def clustered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    clusters: int,
    hash_bits: int = default("hash_bits"),
    iterations: int = default("iterations"),
    hash_bias: bool = default("hash_bias"),
    softmax_temp: Optional[float] = default("softmax_temp"),
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_clusters: bool = False,
) -> Union[Tensor, Tuple[Tensor, ClusterInfo]]:
    """Clustered attention (Vyas et al. 2020): every query gets its cluster centroid's attention output.

    Queries are hashed with ``hash_bits`` random hyperplanes, grouped by Hamming k-means into
    ``min(clusters, L)`` clusters, and the attention of each centroid (the mean of its member
    queries) is computed exactly: ``V^c = softmax(τ Q_c Kᵀ) V``. Returns (N, H, L, M), and the
    :class:`ClusterInfo` too when ``return_clusters``.
    """
    _validate(q, k, v, clusters, hash_bits, iterations, hash_bias, softmax_temp, key_padding_mask, query_padding_mask,
              generator)  # fmt: skip
    assignment, counts, centroids, _, _ = _cluster_queries(
        q, clusters, hash_bits, iterations, hash_bias, query_padding_mask, generator
    )
    scale = _scale(softmax_temp, q.shape[-1])
    if compiled.usable(q):
        # softmax(τ Q_c Kᵀ) V per cluster in one operator (topk 0: no top-k set), over blocks of
        # clusters; for inference without any (C, S) tensor.
        if _needs_grad(q, k, v):
            values = torch.ops.fairseq_clustered.centroid_attention(centroids, k, v, key_padding_mask, 0, scale)[3]
        else:
            values = torch.ops.fairseq_clustered.centroid_topk(centroids, k, v, key_padding_mask, 0, scale)[2]
    else:
        attn = _softmax(centroids @ k.transpose(-1, -2) * scale, key_padding_mask).to(v.dtype)  # (N, H, C, S)
        values = attn @ v  # (N, H, C, M)
    out = _zero_padded_queries(_broadcast(values, assignment), query_padding_mask)  # (N, H, L, M)
    return (out, ClusterInfo(assignment, counts, None, counts.shape[-1])) if return_clusters else out


def _topk_products_reference(q, k, v, attn, assignment, kk, scale, key_padding_mask):
    """m̂ (N, H, C), the rest Σ_{t∉T_j} A^c_jt v_t (N, H, C, M), and every query's exact attention
    over its cluster's top-k keys (N, H, L, M), gathering k keys and values per query."""
    n, h, length, e = q.shape
    s, m = k.shape[2], v.shape[3]
    # Top-k keys per cluster; padded keys rank below every real key (their weight is 0 either way).
    rank = attn.detach()
    if key_padding_mask is not None:
        rank = rank.masked_fill(key_padding_mask[:, None, None, :], -1.0)
    top = rank.topk(kk, dim=-1).indices  # (N, H, C, k)
    top_attn = attn.gather(-1, top)  # (N, H, C, k), differentiable
    topk_mass = top_attn.sum(-1)  # (N, H, C): m̂
    rest = attn.scatter(-1, top, 0.0).to(v.dtype) @ v  # (N, H, C, M): Σ_{t∉T_j} A^c_jt v_t

    query_top = top.gather(2, assignment.clamp_min(0).unsqueeze(-1).expand(n, h, length, kk))  # (N, H, L, k)
    rows = (query_top + torch.arange(n * h, device=q.device).view(n, h, 1, 1) * s).flatten()  # rows of (N*H*S)
    k_top = k.reshape(n * h * s, e).index_select(0, rows).view(n, h, length, kk, e)  # (N, H, L, k, E)
    v_top = v.reshape(n * h * s, m).index_select(0, rows).view(n, h, length, kk, m)  # (N, H, L, k, M)
    scores = torch.einsum("nhle,nhlke->nhlk", q, k_top) * scale  # (N, H, L, k)
    if key_padding_mask is not None:
        padded = key_padding_mask[:, None, :].expand(n, h, s).gather(2, query_top.view(n, h, -1)).view_as(scores)
        scores = scores.masked_fill(padded, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    top_out = torch.einsum("nhlk,nhlkm->nhlm", weights, v_top)  # (N, H, L, M)
    return topk_mass, rest, top_out


def improved_clustered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    clusters: int,
    topk: int = default("topk"),
    hash_bits: int = default("hash_bits"),
    iterations: int = default("iterations"),
    hash_bias: bool = default("hash_bias"),
    softmax_temp: Optional[float] = default("softmax_temp"),
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_clusters: bool = False,
) -> Union[Tensor, Tuple[Tensor, ClusterInfo]]:
    """Improved clustered attention: exact attention on each cluster's top-k keys.

    With T_j the ``topk`` keys of cluster j under the centroid attention A^c and
    m̂_j = Σ_{t∈T_j} A^c_jt, query i of cluster j gets
    ``m̂_j Σ_{t∈T_j} softmax_t(τ q_i·k_t) v_t + Σ_{t∉T_j} A^c_jt v_t``.
    With ``topk >= S`` this is exactly softmax attention. Padded keys never enter a top-k set
    ahead of a real key and never receive weight. Gradients flow through m̂ too.
    """
    _validate(q, k, v, clusters, hash_bits, iterations, hash_bias, softmax_temp, key_padding_mask, query_padding_mask,
              generator)  # fmt: skip
    check("topk", topk)
    scale = _scale(softmax_temp, q.shape[-1])
    assignment, counts, centroids, order, offsets = _cluster_queries(
        q, clusters, hash_bits, iterations, hash_bias, query_padding_mask, generator
    )
    kk = min(topk, k.shape[2])
    if implementation(q) == "triton":
        from .triton import sparse  # imports triton: only on this path

        # Centroid softmax + top-k + m̂ in one kernel per row, rest in fp32, and the top-k attention
        # over tiles of (cluster, queries), which writes m̂·O + rest directly; the tiles come from
        # k-means' own counting sort (order / offsets), so nothing sorts here.
        topk_mass, out = sparse.topk_products(q, k, v, centroids, assignment, kk, scale, key_padding_mask,
                                              order=order, offsets=offsets)  # fmt: skip
        out = _zero_padded_queries(out, query_padding_mask)
        return (out, ClusterInfo(assignment, counts, topk_mass.detach(), counts.shape[-1])) if return_clusters else out
    if compiled.usable(q) and not _needs_grad(q, k, v):
        # Inference: the centroid scores, softmax, top-k, m̂ and rest in one pass over blocks of
        # clusters (no (C, S) tensor), then the top-k attention writes m̂·top + rest directly.
        top, topk_mass, rest = torch.ops.fairseq_clustered.centroid_topk(centroids, k, v, key_padding_mask, kk, scale)
        out = torch.ops.fairseq_clustered.topk_attention_combine(q, k, v, assignment, top, topk_mass, rest,
                                                                 key_padding_mask, scale)  # fmt: skip
        return (out, ClusterInfo(assignment, counts, topk_mass, counts.shape[-1])) if return_clusters else out
    if compiled.usable(q):
        # The centroid scores, their softmax and top-k sets, m̂ (N, H, C) and Σ_{t∉T_j} A^c_jt v_t
        # (N, H, C, M) in one operator (A^c V minus the k top terms of each row); the exact products
        # over each cluster's top-k keys without gathering them per query.
        _, top, topk_mass, rest = torch.ops.fairseq_clustered.centroid_attention(centroids, k, v, key_padding_mask,
                                                                                kk, scale)  # fmt: skip
        top_out, _ = torch.ops.fairseq_clustered.topk_attention(q, k, v, assignment, top, key_padding_mask, scale)
        # m̂·top + rest in one pass over the queries; padded queries (assignment -1) come out zero.
        out = torch.ops.fairseq_clustered.cluster_combine(top_out, topk_mass, rest, assignment)
        return (out, ClusterInfo(assignment, counts, topk_mass.detach(), counts.shape[-1])) if return_clusters else out
    attn = _softmax(centroids @ k.transpose(-1, -2) * scale, key_padding_mask)  # (N, H, C, S), fp32+
    topk_mass, rest, top_out = _topk_products_reference(q, k, v, attn, assignment, kk, scale, key_padding_mask)
    mass = _broadcast(topk_mass.unsqueeze(-1), assignment).to(v.dtype)  # (N, H, L, 1)
    out = torch.addcmul(_broadcast(rest, assignment), mass, top_out)  # m̂·top + rest in one pass
    out = _zero_padded_queries(out, query_padding_mask)
    if not return_clusters:
        return out
    return out, ClusterInfo(assignment, counts, topk_mass.detach(), counts.shape[-1])
