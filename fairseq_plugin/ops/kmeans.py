"""Lloyd's k-means in Hamming space on packed LSH codes (DESIGN.md §2, step 2).

Assign: argmin over clusters of popcount(h xor c), ties to the lowest cluster index.
Update: per-bit majority vote of the members (a tie votes 0). A cluster left empty by an update
is re-seeded with the code of a random real query drawn from ``generator``. Padded queries take
no part and get assignment -1.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .checks import check_generator, check_int, check_mask, MAX_HASH_BITS
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
    """Uniformly random real query positions, shape (N, H, C); real_order lists real positions first."""
    n, h, c = shape
    u = torch.rand(n, h, c, generator=generator, device=real_order.device, dtype=torch.float64)
    rank = (u * real_count.view(n, 1, 1)).long().clamp_max(real_count.view(n, 1, 1) - 1)  # (N, H, C)
    return real_order.view(n, 1, -1).expand(n, h, -1).gather(-1, rank)


@torch.no_grad()
def hamming_kmeans(
    codes: Tensor,
    hash_bits: int,
    clusters: int,
    iterations: int = 10,
    padding_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Cluster int64 codes (N, H, L) into ``min(clusters, L)`` clusters.

    Returns ``(assignment, counts)``: assignment (N, H, L) int64 in [0, C) and -1 for padded
    queries, counts (N, H, C) int64 members per cluster. The initial centroids are distinct real
    queries drawn from ``generator`` (repeated when a row has fewer real queries than clusters).
    """
    if codes.dim() != 3 or codes.dtype != torch.int64:
        raise ValueError(f"codes must be an int64 tensor (N, H, L), got {codes.dtype} {tuple(codes.shape)}")
    check_int(hash_bits, "hash_bits", 1, MAX_HASH_BITS)
    check_int(clusters, "clusters", 1)
    check_int(iterations, "iterations", 0)
    check_generator(generator, codes.device)
    n, h, length = codes.shape
    check_mask(padding_mask, "query_padding_mask", n, length, codes.device)
    c = min(clusters, length)

    if padding_mask is None:
        padding_mask = torch.zeros(n, length, dtype=torch.bool, device=codes.device)
    real = ~padding_mask.view(n, 1, length).expand(n, h, length)  # (N, H, L)
    real_count = (~padding_mask).sum(1).clamp_min(1)  # (N,)
    real_order = torch.argsort(padding_mask.to(torch.int8), dim=1, stable=True)  # real positions first

    bits = unpack_bits(codes, hash_bits).to(torch.float32)  # (N, H, L, B)

    # Initialisation: a random permutation of the real queries per (n, h); the first C of it
    # (cycled when a row has fewer than C real queries).
    keys = torch.rand(n, h, length, generator=generator, device=codes.device, dtype=torch.float64)
    keys = keys.masked_fill(~real, 2.0)
    perm = torch.argsort(keys, dim=-1, stable=True)  # (N, H, L), real queries first
    slot = torch.arange(c, device=codes.device).view(1, 1, c) % real_count.view(n, 1, 1)  # (N, 1, C)
    init = perm.gather(-1, slot.expand(n, h, c))  # (N, H, C)
    centroid_bits = bits.gather(2, init.unsqueeze(-1).expand(n, h, c, hash_bits))  # (N, H, C, B)

    for _ in range(iterations):
        assignment = _assign(bits, centroid_bits, real)
        members = _one_hot(assignment, c, torch.float32)  # (N, H, L, C)
        size = members.sum(2)  # (N, H, C)
        ones = members.transpose(-1, -2) @ bits  # (N, H, C, B)
        centroid_bits = (2 * ones > size.unsqueeze(-1)).to(torch.float32)
        reseed = _random_real_positions(real_order, real_count, (n, h, c), generator)  # drawn every step
        reseed_bits = bits.gather(2, reseed.unsqueeze(-1).expand(n, h, c, hash_bits))
        centroid_bits = torch.where((size == 0).unsqueeze(-1), reseed_bits, centroid_bits)

    assignment = _assign(bits, centroid_bits, real)
    counts = _one_hot(assignment, c, torch.int64).sum(2)
    return assignment, counts
