"""Lloyd's k-means in Hamming space on packed LSH codes (DESIGN.md §2, step 2).

Assign: argmin over clusters of popcount(h xor c), ties to the lowest cluster index.
Update: per-bit majority vote of the members (a tie votes 0). A cluster left empty by an update
is re-seeded with the code of a random real query drawn from ``generator``. Padded queries take
no part and get assignment -1.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import compiled
from .backend import implementation
from .checks import check_clustering, check_generator, check_mask
from .options import default
from .hashing import unpack_bits


def _assign(bits: Tensor, centroid_bits: Tensor, real: Tensor) -> Tensor:
    """Nearest centroid in Hamming distance for bits (N, H, L, B) and centroids (N, H, C, B).

    popcount(h xor c) = |h| + |c| - 2 h.c, and |h| is the same for every cluster, so the argmin
    is that of |c| - 2 h.c: integers <= 63, exact in float32. Ties go to the lowest index.
    """
    n, h, length, b = bits.shape
    c = centroid_bits.shape[2]
    dist = torch.baddbmm(
        centroid_bits.sum(-1).view(n * h, 1, c),
        bits.view(n * h, length, b),
        centroid_bits.view(n * h, c, b).transpose(1, 2),
        alpha=-2,
    )  # (N*H, L, C)
    return dist.argmin(-1).view(n, h, length).masked_fill(~real, -1)


def _one_hot(assignment: Tensor, clusters: int, dtype: torch.dtype) -> Tensor:
    """(N, H, L) assignments with -1 for padding -> (N, H, L, C) one-hot rows, zero for padding."""
    one_hot = torch.zeros(*assignment.shape, clusters + 1, dtype=dtype, device=assignment.device)
    one_hot.scatter_(-1, (assignment + 1).unsqueeze(-1), 1)  # column 0 collects the padding
    return one_hot[..., 1:]


def _random_real_positions(
    real_order: Tensor, real_count: Tensor, shape: Tuple[int, ...], generator: Optional[torch.Generator]
) -> Tensor:
    """Uniformly random real query positions of shape (..., N, H, C); real_order (N, L) lists the
    real positions first, real_count (N,) counts them."""
    n = real_order.shape[0]
    u = torch.rand(shape, generator=generator, device=real_order.device, dtype=torch.float64)
    count = real_count.view(n, 1, 1)
    rank = (u * count).long().clamp_max(count - 1)  # (..., N, H, C)
    lead = shape[:-3]
    order = real_order.view(*(1,) * len(lead), n, 1, -1).expand(*lead, n, shape[-2], -1)
    return order.gather(-1, rank)


def draw_kmeans_seeds(
    n: int,
    h: int,
    length: int,
    clusters: int,
    iterations: int,
    padding_mask: Optional[Tensor],
    generator: Optional[torch.Generator],
    device: torch.device,
) -> Tuple[Tensor, Tensor]:
    """The random part of k-means, drawn up front from ``generator`` so that the compiled kernel
    and the reference consume the same stream and agree bit for bit.

    Returns ``(init, reseed)``: init (N, H, C) int64, the initial centroids as query positions (a
    random permutation of the real queries per (n, h), its first C, cycled when a row has fewer
    than C real queries); reseed (iterations, N, H, C) int64, for every iteration a uniformly random
    real query per cluster, whose code an empty cluster takes. ``padding_mask`` None (no padding)
    draws exactly what an all-False mask draws, without sorting the positions (0.35 ms at L = 8k).
    """
    keys = torch.rand(n, h, length, generator=generator, device=device, dtype=torch.float64)
    if padding_mask is None:
        # The C smallest keys in order: the first C of a random permutation (O(L), not a sort).
        first = keys.topk(clusters, dim=-1, largest=False, sorted=True).indices  # (N, H, C)
        u = torch.rand(iterations, n, h, clusters, generator=generator, device=device, dtype=torch.float64)
        reseed = (u * length).long().clamp_max(length - 1)  # as _random_real_positions with every query real
        return first, reseed
    real = ~padding_mask.view(n, 1, length).expand(n, h, length)  # (N, H, L)
    real_count = (~padding_mask).sum(1).clamp_min(1)  # (N,)
    real_order = torch.argsort(padding_mask.to(torch.int8), dim=1, stable=True)  # real positions first
    keys = keys.masked_fill(~real, 2.0)
    # The C smallest keys in order: the first C of a random permutation with the real queries
    # first (O(L), not a sort; the keys of real queries are distinct with probability 1).
    first = keys.topk(clusters, dim=-1, largest=False, sorted=True).indices  # (N, H, C)
    slot = torch.arange(clusters, device=device).view(1, 1, clusters) % real_count.view(n, 1, 1)  # (N, 1, C)
    init = first.gather(-1, slot.expand(n, h, clusters))  # (N, H, C)
    reseed = _random_real_positions(real_order, real_count, (iterations, n, h, clusters), generator)
    return init, reseed


def kmeans_from_seeds(
    codes: Tensor, hash_bits: int, init: Tensor, reseed: Tensor, padding_mask: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """The deterministic part of k-means (the PyTorch reference): ``reseed.shape[0]`` Lloyd
    iterations from the centroids ``codes[init]``, then a final assignment."""
    n, h, length = codes.shape
    c = init.shape[-1]
    real = torch.ones(n, h, length, dtype=torch.bool, device=codes.device)
    if padding_mask is not None:
        real = ~padding_mask.view(n, 1, length).expand(n, h, length)
    bits = unpack_bits(codes, hash_bits).to(torch.float32)  # (N, H, L, B)
    centroid_bits = bits.gather(2, init.unsqueeze(-1).expand(n, h, c, hash_bits))  # (N, H, C, B)
    for reseed_step in reseed:
        assignment = _assign(bits, centroid_bits, real)
        members = _one_hot(assignment, c, torch.float32)  # (N, H, L, C)
        size = members.sum(2)  # (N, H, C)
        ones = members.transpose(-1, -2) @ bits  # (N, H, C, B)
        centroid_bits = (2 * ones > size.unsqueeze(-1)).to(torch.float32)
        reseed_bits = bits.gather(2, reseed_step.unsqueeze(-1).expand(n, h, c, hash_bits))
        centroid_bits = torch.where((size == 0).unsqueeze(-1), reseed_bits, centroid_bits)

    assignment = _assign(bits, centroid_bits, real)
    counts = _one_hot(assignment, c, torch.int64).sum(2)
    return assignment, counts


@torch.no_grad()
def hamming_kmeans(
    codes: Tensor,
    hash_bits: int,
    clusters: int,
    iterations: int = default("iterations"),
    padding_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_order: bool = False,
) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Cluster int64 codes (N, H, L) into ``min(clusters, L)`` clusters.

    Returns ``(assignment, counts)``: assignment (N, H, L) int64 in [0, C) and -1 for padded
    queries, counts (N, H, C) int64 members per cluster. The initial centroids are distinct real
    queries drawn from ``generator`` (repeated when a row has fewer real queries than clusters).
    With ``return_order`` also ``order`` (N, H, L) int32, the queries sorted by cluster (stable,
    padded last), and ``offsets`` (N, H, C+1) int32: cluster j is ``order[..., offsets[j]:offsets[j+1]]``.
    Runs the Triton kernel (which emits order/offsets without sorting) or the compiled one when
    available (:func:`.backend.implementation`), else the reference.
    """
    if codes.dim() != 3 or codes.dtype != torch.int64:
        raise ValueError(f"codes must be an int64 tensor (N, H, L), got {codes.dtype} {tuple(codes.shape)}")
    check_clustering(clusters, hash_bits, iterations)
    check_generator(generator, codes.device)
    n, h, length = codes.shape
    check_mask(padding_mask, "query_padding_mask", n, length, codes.device)
    c = min(clusters, length)
    init, reseed = draw_kmeans_seeds(n, h, length, c, iterations, padding_mask, generator, codes.device)
    if implementation(codes) == "triton":
        from .triton import kmeans as triton_kmeans  # imports triton: only on this path

        assignment, counts, order, offsets = triton_kmeans.hamming_kmeans(codes, init, reseed, padding_mask, hash_bits)
        return (assignment, counts, order, offsets) if return_order else (assignment, counts)
    if compiled.usable(codes):
        assignment, counts = torch.ops.fairseq_clustered.hamming_kmeans(codes, init, reseed, padding_mask, hash_bits)
    else:
        assignment, counts = kmeans_from_seeds(codes, hash_bits, init, reseed, padding_mask)
    return (assignment, counts, *cluster_order(assignment, counts)) if return_order else (assignment, counts)


def cluster_order(assignment: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """``(order, offsets)`` of :func:`hamming_kmeans` from an assignment (N, H, L) and counts (N, H, C),
    by a stable sort (the Triton kernel gets them by counting instead)."""
    c = counts.shape[-1]
    order = torch.argsort(assignment.masked_fill(assignment < 0, c), dim=-1, stable=True).to(torch.int32)
    offsets = torch.zeros(*counts.shape[:-1], c + 1, dtype=torch.int32, device=counts.device)
    offsets[..., 1:] = counts.cumsum(-1)
    return order, offsets
