"""Locality-sensitive hashing of queries into packed int64 codes (DESIGN.md §2, step 1)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import compiled
from .backend import implementation
from .options import check, default


def draw_planes(
    hash_bits: int,
    dim: int,
    hash_bias: bool = default("hash_bias"),
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw ``hash_bits`` random hyperplanes ``a_b`` in R^(dim+1), returned as (hash_bits, dim + 1) float32.

    Column ``dim`` holds the offsets (the hash bias); without bias it is zero, so every plane
    passes through the origin. Drawn from ``generator`` so a seed reproduces the planes exactly.
    """
    check("hash_bits", hash_bits)
    planes = torch.randn(hash_bits, dim + 1, generator=generator, device=device, dtype=torch.float32)
    if not hash_bias:
        planes[:, dim] = 0.0
    return planes


PLANE_ROWS = 16  # the projection GEMM's planes are padded with zero rows to a multiple of this
HASH_ROWS = 2048  # ... and it runs over chunks of this many vectors


def hash_bits_of(x: Tensor, planes: Tensor) -> Tensor:
    """The bits ``[a_b[:E] . x > a_b[E]]`` as a bool tensor (..., B).

    The projections are GEMMs against the planes padded with zero rows to a multiple of
    :data:`PLANE_ROWS` (63 -> 64; a full-width GEMM kernel, 1.5x faster than one for 63 columns on
    AVX2), over chunks of :data:`HASH_ROWS` vectors (the compiled kernel packs each chunk's bits
    while its projections are in cache). The compiled kernel makes the same calls, so its codes
    are this function's bit for bit."""
    dim = planes.shape[1] - 1
    if x.shape[-1] != dim:
        raise ValueError(f"x has feature size {x.shape[-1]} but planes were drawn for {dim}")
    compute = torch.promote_types(x.dtype, torch.float32)
    bits = planes.shape[0]
    weights = planes.new_zeros(-(-bits // PLANE_ROWS) * PLANE_ROWS, dim, dtype=compute)
    weights[:bits] = planes[:, :dim]
    rows = x.to(compute).reshape(-1, dim)
    chunks = [rows[r : r + HASH_ROWS] @ weights.T for r in range(0, rows.shape[0], HASH_ROWS)]
    proj = torch.cat(chunks) if chunks else rows @ weights.T
    proj = proj.view(*x.shape[:-1], weights.shape[0])  # (..., padded B)
    return proj[..., :bits] > planes[:, dim].to(compute)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool tensor (..., B), B <= 63, into int64 codes: bit b of the code is ``bits[..., b]``."""
    weights = torch.ones(bits.shape[-1], dtype=torch.int64, device=bits.device) << torch.arange(
        bits.shape[-1], device=bits.device
    )
    return (bits.to(torch.int64) * weights).sum(-1)


def unpack_bits(codes: Tensor, hash_bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: int64 codes (...) -> bool bits (..., hash_bits)."""
    shifts = torch.arange(hash_bits, device=codes.device)
    return ((codes.unsqueeze(-1) >> shifts) & 1).bool()


@torch.no_grad()
def lsh_hash(x: Tensor, planes: Tensor) -> Tensor:
    """Hash vectors x (..., E) with hyperplanes (B, E + 1) into int64 codes (...), bit b = plane b.

    Runs the compiled kernel when one is available (:mod:`.compiled`): the same projection GEMM
    with the threshold and the packing fused, so the codes are identical to the reference's. The
    Triton kernel (:func:`.backend.implementation`) fuses them too; its projections are summed in
    another order, so a projection within a few ulps of its threshold may flip its bit
    (:mod:`.triton.hashing`)."""
    if implementation(x) == "triton" and x.shape[-1] == planes.shape[1] - 1:
        from .triton import hashing  # imports triton: only on this path

        return hashing.lsh_hash(x, planes)
    if compiled.usable(x) and x.shape[-1] == planes.shape[1] - 1:
        return torch.ops.fairseq_clustered.lsh_hash(x, planes)
    return pack_bits(hash_bits_of(x, planes))
