"""The compiled operators of csrc/ against the PyTorch reference (CPU; CUDA in test_compiled_cuda.py).

Every operator is compared with its reference on fresh random inputs (sizes that are not
multiples of 32, L < C, one query, padded queries and keys, topk > S, hash_bits 1 and 63), forward
and backward, in float32 and float64; gradcheck in float64; opcheck; a fuzz test; bit-for-bit
reproducibility with a seed and across thread counts; the loud fallback when the extension is
missing; and torch.compile tracing through the fake kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_plugin.ops import clustered_attention, compiled, improved_clustered_attention
from fairseq_plugin.ops.clustered import _topk_products_reference
from fairseq_plugin.ops.hashing import HASH_ROWS, draw_planes, hash_bits_of, pack_bits
from fairseq_plugin.ops.kmeans import _one_hot, draw_kmeans_seeds, kmeans_from_seeds

from . import gen, make_qkv, padding_mask, rel_err

REPO = Path(__file__).resolve().parents[2]
compiled.load()  # registers torch.ops.fairseq_clustered (test_extension_is_built_and_loaded fails if it cannot)
OPS = torch.ops.fairseq_clustered
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def test_extension_is_built_and_loaded():
    """A build that silently failed would leave every op on the reference: fail loudly here."""
    assert compiled.load(), f"fairseq_plugin._C did not load: {compiled.load_error()} ({compiled.REBUILD})"
    assert compiled.usable(torch.zeros(1))
    assert not compiled.usable(torch.zeros(1, dtype=torch.bfloat16))  # CPU half precision: the reference


# ---------------------------------------------------------------------------------------------
# One operator at a time


@pytest.mark.parametrize("hash_bits", [1, 17, 63])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lsh_hash_identical_to_reference(hash_bits, dtype):
    x = torch.randn(2, 3, 45, 19, generator=gen(hash_bits), dtype=dtype)
    planes = draw_planes(hash_bits, 19, generator=gen(1))
    codes = OPS.lsh_hash(x, planes)
    assert torch.equal(codes, pack_bits(hash_bits_of(x, planes)))
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**hash_bits
    # non-contiguous input (the attention module passes permuted projections)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(OPS.lsh_hash(xt, planes), codes)


def test_lsh_hash_in_chunks_identical_to_reference():
    """More vectors than one projection chunk (HASH_ROWS), not a multiple of it, and none."""
    for shape in ((2, 1, HASH_ROWS + 37, 64), (1, 3, HASH_ROWS, 64), (0, 2, 5, 64)):
        x = torch.randn(*shape, generator=gen(7))
        planes = draw_planes(63, 64, generator=gen(8))
        assert torch.equal(OPS.lsh_hash(x, planes), pack_bits(hash_bits_of(x, planes))), shape


def _kmeans_inputs(n, h, length, c, iterations, hash_bits, seed, pad_lengths=None, distinct=None):
    g = gen(seed)
    if distinct is None:
        codes = pack_bits(torch.rand(n, h, length, hash_bits, generator=g) < 0.5)
    else:  # few distinct codes: clusters empty out and are re-seeded every iteration
        pool = pack_bits(torch.rand(distinct, hash_bits, generator=g) < 0.5)
        codes = pool[torch.randint(0, distinct, (n, h, length), generator=g)]
    pad = torch.zeros(n, length, dtype=torch.bool) if pad_lengths is None else padding_mask(pad_lengths, length)
    init, reseed = draw_kmeans_seeds(n, h, length, c, iterations, pad, g, codes.device)
    return codes, init, reseed, (pad if pad_lengths is not None else None)


@pytest.mark.parametrize(
    "n,h,length,c,iterations,hash_bits,pad_lengths,distinct",
    [
        (2, 3, 37, 6, 5, 63, None, None),
        (1, 2, 100, 31, 10, 63, None, None),
        (2, 2, 45, 8, 4, 1, None, None),  # one bit: at most two distinct codes
        (2, 3, 53, 7, 6, 20, [53, 11], None),
        (2, 2, 40, 9, 7, 63, [40, 3], 3),  # fewer real queries than clusters, empty clusters
        (1, 1, 1, 1, 3, 63, None, None),  # one query
        (3, 1, 33, 33, 0, 63, None, None),  # C = L, no iteration
        (1, 2, 1003, 300, 4, 63, None, None),  # AVX2 block scan: 3 chunks of centroids, a 32-query tail
        (2, 1, 611, 140, 6, 9, [611, 200], None),  # few distinct codes: distance ties across chunks
    ],
)
def test_hamming_kmeans_identical_to_reference(n, h, length, c, iterations, hash_bits, pad_lengths, distinct):
    codes, init, reseed, pad = _kmeans_inputs(n, h, length, c, iterations, hash_bits, length + c, pad_lengths, distinct)
    a, counts = OPS.hamming_kmeans(codes, init, reseed, pad, hash_bits)
    ra, rcounts = kmeans_from_seeds(codes, hash_bits, init, reseed, pad)
    assert torch.equal(a, ra)
    assert torch.equal(counts, rcounts)
    if pad is not None:
        assert bool((a[pad[:, None, :].expand_as(a)] == -1).all())


def test_hamming_kmeans_ignores_bits_above_hash_bits():
    """The reference reads a code's low hash_bits bits only (lsh_hash sets no others); the kernel
    agrees on codes that carry more, bit 63 (negative codes) included."""
    codes, init, reseed, _ = _kmeans_inputs(2, 2, 300, 20, 6, 17, 320, None, None)
    noisy = codes | (torch.randint(0, 2**46, codes.shape, generator=gen(5)) << 17)
    noisy[0, 0, ::3] |= torch.iinfo(torch.long).min  # bit 63
    got = OPS.hamming_kmeans(noisy, init, reseed, None, 17)
    want = kmeans_from_seeds(noisy, 17, init, reseed, None)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert all(torch.equal(x, y) for x, y in zip(got, OPS.hamming_kmeans(codes, init, reseed, None, 17)))


def _assignment(n, h, length, c, seed, pad_lengths=None):
    a = torch.randint(0, c, (n, h, length), generator=gen(seed))
    if pad_lengths is not None:
        a = a.masked_fill(padding_mask(pad_lengths, length)[:, None, :], -1)
    return a


@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_sum_and_broadcast_match_reference(dtype):
    n, h, length, c, d = 2, 3, 41, 7, 13
    x = torch.randn(n, h, length, d, generator=gen(0), dtype=dtype, requires_grad=True)
    a = _assignment(n, h, length, c, 1, [length, 30])
    sums = OPS.cluster_sum(x, a, c)
    ref = _one_hot(a, c, dtype).transpose(-1, -2) @ x
    assert rel_err(sums, ref) < TOL[dtype]
    y = torch.randn(n, h, c, d, generator=gen(2), dtype=dtype, requires_grad=True)
    out = OPS.cluster_broadcast(y, a)
    ref_out = torch.where((a >= 0)[..., None], y.gather(2, a.clamp_min(0)[..., None].expand(n, h, length, d)), 0.0)
    assert torch.equal(out, ref_out)
    g1 = torch.randn_like(sums)
    g2 = torch.randn_like(out)
    (gx,) = torch.autograd.grad(sums, x, g1)
    (rgx,) = torch.autograd.grad(ref, x, g1)
    assert rel_err(gx, rgx) < TOL[dtype]
    (gy,) = torch.autograd.grad(out, y, g2)
    (rgy,) = torch.autograd.grad(ref_out, y, g2)
    assert rel_err(gy, rgy) < TOL[dtype]


def _combine_reference(top, mass, rest, a):
    n, h, length, m = top.shape
    idx = a.clamp_min(0)
    out = mass.gather(2, idx).unsqueeze(-1) * top + rest.gather(2, idx.unsqueeze(-1).expand(n, h, length, m))
    return torch.where((a >= 0).unsqueeze(-1), out, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_combine_matches_reference(dtype):
    """m̂·top + rest per query, forward and backward; padded queries exactly 0; NaN stays NaN."""
    n, h, length, c, m = 2, 3, 41, 7, 13
    a = _assignment(n, h, length, c, 1, [length, 30])
    top = torch.randn(n, h, length, m, generator=gen(3), dtype=dtype, requires_grad=True)
    mass = torch.rand(n, h, c, generator=gen(4), dtype=dtype, requires_grad=True)
    rest = torch.randn(n, h, c, m, generator=gen(5), dtype=dtype, requires_grad=True)
    out = OPS.cluster_combine(top, mass, rest, a)
    ref = _combine_reference(top, mass, rest, a)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out[a < 0], torch.zeros_like(out[a < 0])) and (a < 0).any()
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (top, mass, rest), g), torch.autograd.grad(ref, (top, mass, rest), g)):
        assert rel_err(got, want) < TOL[dtype]
    with torch.no_grad():
        bad_top, bad_mass = top.clone(), mass.clone()
        bad_top[0, 0, 3, 5] = float("nan")
        cluster = int(a[1, 2, 0])
        bad_mass[1, 2, cluster] = float("inf")
        out = OPS.cluster_combine(bad_top, bad_mass, rest, a)
    assert out[0, 0, 3].isnan().any() and out[0, 0, :3].isfinite().all()
    hit = a[1, 2] == cluster
    assert not out[1, 2][hit].isfinite().all(dim=-1).any() and out[1, 2][~hit].isfinite().all()


def _centroid_reference(centroids, k, v, kpm, topk, scale):
    """attn, top, m̂ and Σ_{t∉T} A_t v_t from ATen's softmax and a masked A^c (what
    _topk_products_reference computes), differentiable; top ranked as softmax_topk ranks."""
    scores = (centroids * scale) @ k.transpose(-1, -2)
    if kpm is not None:
        scores = scores.masked_fill(kpm[:, None, None, :], float("-inf"))
    attn = torch.softmax(scores, -1)
    rank = attn.detach() if kpm is None else attn.detach().masked_fill(kpm[:, None, None, :], -1.0)
    top = rank.sort(dim=-1, descending=True, stable=True).indices[..., : min(topk, k.shape[2])]
    return attn, top, attn.gather(-1, top).sum(-1), attn.scatter(-1, top, 0.0) @ v


@pytest.mark.parametrize(
    "n,h,c,s,e,m,topk,kpm_lengths",
    [
        (2, 3, 7, 41, 16, 12, 7, [41, 12]),
        (2, 3, 7, 41, 16, 12, 0, [41, 12]),  # no top-k set: rest = A V (clustered attention)
        (1, 2, 100, 1024, 64, 64, 32, None),  # the benchmark's shape at 1k
        (1, 1, 100, 6000, 8, 5, 32, [5000]),  # one head: split into blocks for the threads; long rows
        (2, 1, 3, 5, 4, 3, 9, [5, 2]),  # topk > S
        (1, 2, 1, 1, 3, 2, 1, None),  # one centroid, one key
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_centroid_attention_matches_reference(n, h, c, s, e, m, topk, kpm_lengths, dtype):
    """attn, top, m̂ and the rest term, and the gradients of centroids, k and v through m̂ and the rest
    (either alone too); the inference operator centroid_topk gives the same top, m̂ and rest."""
    cen = torch.randn(n, h, c, e, generator=gen(c + s), dtype=dtype, requires_grad=True)
    k = torch.randn(n, h, s, e, generator=gen(1), dtype=dtype, requires_grad=True)
    v = torch.randn(n, h, s, m, generator=gen(2), dtype=dtype, requires_grad=True)
    kpm = None if kpm_lengths is None else padding_mask(kpm_lengths, s, left=[False, True])
    attn, top, mass, rest = OPS.centroid_attention(cen, k, v, kpm, topk, 0.3)
    want = _centroid_reference(cen, k, v, kpm, topk, 0.3)
    assert top.shape == (n, h, c, min(topk, s)) and torch.equal(top, want[1])
    assert attn.dtype == mass.dtype == rest.dtype == dtype
    assert rel_err(attn, want[0]) < TOL[dtype] and rel_err(mass, want[2]) < TOL[dtype]
    full = (want[0] @ v).detach()  # rest is A V minus the top terms: it rounds like the full product

    def err(a, b, scale):  # (and it is exactly 0 when topk = S)
        return float((a - b).norm() / max(float(b.norm()), float(scale.norm()), 1e-30))

    assert err(rest.detach(), want[3].detach(), full) < TOL[dtype]
    gm, gr = torch.randn_like(mass), torch.randn_like(rest)
    # the gradients' scale before the top terms cancel (they may be all rounding, e.g. with topk >= S)
    scales = torch.autograd.grad(((want[0] @ v) * gr).sum(), (cen, k, v), retain_graph=True)
    for outs in ((0, 1), (0,), (1,)):  # an unused output reaches the backward as None
        g_out = [(gm, gr)[i] for i in outs]
        grads = torch.autograd.grad([(mass, rest)[i] for i in outs], (cen, k, v), g_out, retain_graph=True)
        ref = torch.autograd.grad([(want[2], want[3])[i] for i in outs], (cen, k, v), g_out, retain_graph=True,
                                  allow_unused=True, materialize_grads=True)  # fmt: skip
        for got, expected, scale in zip(grads, ref, scales):
            assert err(got, expected, scale) < TOL[dtype], (outs, err(got, expected, scale))
    with torch.no_grad():
        top2, mass2, rest2 = OPS.centroid_topk(cen, k, v, kpm, topk, 0.3)
    assert torch.equal(top2, top) and torch.equal(mass2, mass) and torch.equal(rest2, rest)


def test_centroid_attention_non_finite_rows_are_nan():
    """A NaN or inf in a centroid makes its row's attn, m̂ and rest NaN, and its gradients NaN, with
    top valid key indices; other rows are untouched. Every key padded: NaN too, as softmax_topk."""
    cen, k, v = torch.randn(2, 2, 5, 8, generator=gen(0)), torch.randn(2, 2, 300, 8), torch.randn(2, 2, 300, 6)
    cen[0, 1, 2, 3] = float("nan")
    cen[1, 0, 4, 0] = float("inf")
    bad = torch.zeros(2, 2, 5, dtype=torch.bool)
    bad[0, 1, 2] = bad[1, 0, 4] = True
    kpm = torch.zeros(2, 300, dtype=torch.bool)
    for mask in (None, kpm):
        for inference in (False, True):
            cc = cen.clone().requires_grad_(not inference)
            if inference:
                top, mass, rest = OPS.centroid_topk(cc, k, v, mask, 16, 0.5)
            else:
                attn, top, mass, rest = OPS.centroid_attention(cc, k, v, mask, 16, 0.5)
                assert bool(attn[bad].isnan().all() and attn[~bad].isfinite().all())
                (grad,) = torch.autograd.grad(rest.sum() + mass.sum(), cc)
                assert bool(grad[bad].isnan().all() and grad[~bad].isfinite().all())
            assert bool(mass[bad].isnan().all() and rest[bad].isnan().all())
            assert bool(mass[~bad].isfinite().all() and rest[~bad].isfinite().all())
            assert bool(((top >= 0) & (top < 300)).all())
    kpm[1] = True
    _, mass, rest = OPS.centroid_topk(cen, k, v, kpm, 16, 0.5)
    assert bool(mass[1].isnan().all() and rest[1].isnan().all())


@pytest.mark.parametrize("topk", [1, 5, 40, 41, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_topk_matches_reference(topk, dtype):
    n, h, c, s = 2, 3, 7, 41
    scores = torch.randn(n, h, c, s, generator=gen(topk), dtype=dtype) * 3
    kpm = padding_mask([s, 12], s, left=[False, True])
    attn, top = OPS.softmax_topk(scores, kpm, topk)
    ref = torch.softmax(scores.masked_fill(kpm[:, None, None, :], float("-inf")), -1)
    assert attn.dtype == dtype and rel_err(attn, ref) < TOL[dtype]
    kk = min(topk, s)
    assert top.shape == (n, h, c, kk)
    rank = ref.masked_fill(kpm[:, None, None, :], -1.0)
    expected = rank.topk(kk, dim=-1).values
    assert torch.equal(rank.gather(-1, top), expected)  # the same values, best first
    for row in top.reshape(-1, kk):  # distinct keys
        assert len(set(row.tolist())) == kk
    # every real key ranks ahead of every padded key
    padded_rank = kpm[:, None, None, :].expand(n, h, c, s).gather(-1, top).to(torch.int8)
    assert bool((padded_rank.diff(dim=-1) >= 0).all())


def test_softmax_topk_ties_go_to_lower_index():
    scores = torch.zeros(1, 1, 2, 9)
    scores[0, 0, 1, 4] = 1.0
    _, top = OPS.softmax_topk(scores, None, 4)
    assert top[0, 0, 0].tolist() == [0, 1, 2, 3]
    assert top[0, 0, 1].tolist() == [4, 0, 1, 2]


def test_softmax_topk_ranks_the_returned_weights():
    """The selection ranks attn, not the scores: two scores that round to one weight tie and go to the
    lower index. Rows long enough for the group-maxima bound, with padding and exact ties."""
    for s in (40, 1000, 8192):
        scores = torch.randn(2, 2, 3, s, generator=gen(s)) * 0.5 - 3
        scores[..., 0] = 0.5
        scores[..., 1] = 0.0
        scores[..., 3] = 1e-8  # -0.5 and -0.5 + 1e-8 round to one float: one weight, though score 3 is larger
        scores[:, :, 2, 10::7] = scores[:, :, 2, 10:11]  # exact ties
        kpm = torch.rand(2, s, generator=gen(s + 1)) < 0.25
        kpm[:, :4] = False
        for mask in (None, kpm):
            attn, top = OPS.softmax_topk(scores, mask, 32)
            assert torch.equal(attn[..., 1], attn[..., 3])  # the construction's premise
            rank = attn if mask is None else attn.masked_fill(mask[:, None, None, :], -1.0)
            assert torch.equal(top, rank.sort(dim=-1, descending=True, stable=True).indices[..., :32])
            assert bool((top[..., 1] == 1).all() and (top[..., 2] == 3).all())
            ref = torch.softmax(scores if mask is None else scores.masked_fill(mask[:, None, None, :], float("-inf")), -1)
            assert rel_err(attn, ref) < TOL[torch.float32]


def test_softmax_topk_non_finite_rows_are_nan_with_valid_indices():
    """A NaN or +inf score at a real key, a row of -inf and a row with every key padded give NaN
    weights, as ATen's softmax does, and top still holds distinct keys in 0..S-1, real ones first."""
    for s in (5, 300, 8192):
        x = torch.randn(2, 2, 4, s, generator=gen(s))
        x[:, 0, 0, 2] = float("nan")
        x[:, 0, 1, 4] = float("inf")
        x[:, 0, 2, :] = float("-inf")
        x[:, 1, 3, 3] = float("nan")  # at a padded key (odd keys below): ignored
        kpm = (torch.arange(s) % 2 == 1)[None].repeat(2, 1)
        kpm[1] = True  # every key padded
        for mask in (None, kpm):
            for topk in (1, 3, 2 * s):
                attn, top = OPS.softmax_topk(x, mask, topk)
                ref = torch.softmax(x if mask is None else x.masked_fill(mask[:, None, None, :], float("-inf")), -1)
                assert torch.equal(torch.isnan(attn), torch.isnan(ref)), (s, mask is not None, topk)
                assert bool(((top >= 0) & (top < s)).all())
                kk = min(topk, s)
                assert all(len(set(row.tolist())) == kk for row in top.reshape(-1, kk))
                if mask is not None:  # real keys first, in every row
                    padded_rank = mask[:, None, None, :].expand_as(x).gather(-1, top).to(torch.int8)
                    assert bool((padded_rank.diff(dim=-1) >= 0).all())


def _topk_case(n, h, length, s, e, m, c, topk, dtype, seed, kpm_lengths=None, qpm_lengths=None):
    q, k, v = make_qkv(n, h, length, s, e, m, seed=seed, dtype=dtype, requires_grad=True)
    kpm = None if kpm_lengths is None else padding_mask(kpm_lengths, s, left=[False, True])
    a = _assignment(n, h, length, c, seed + 1, qpm_lengths)
    attn = torch.softmax(torch.randn(n, h, c, s, generator=gen(seed + 2), dtype=dtype), -1)
    if kpm is not None:
        attn = attn.masked_fill(kpm[:, None, None, :], 0.0)
    kk = min(topk, s)
    _, top = OPS.softmax_topk(attn.log(), kpm, kk)
    return q, k, v, kpm, a, attn, top, kk


@pytest.mark.parametrize(
    "n,h,length,s,e,m,c,topk,kpm_lengths,qpm_lengths",
    [
        (2, 3, 37, 41, 16, 12, 6, 7, None, None),
        (2, 2, 50, 33, 24, 40, 9, 33, [33, 5], [50, 20]),  # topk = S with 28 padded keys in row 1
        (1, 4, 70, 45, 64, 64, 11, 32, [30], None),
        (1, 1, 1, 3, 5, 7, 1, 8, None, None),  # one query, topk > S
        (2, 2, 19, 66, 33, 17, 19, 17, [66, 66], [19, 1]),
        (1, 2, 300, 45, 16, 12, 3, 7, None, [250]),  # ~100 members a cluster: the backward's chunks of 64
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_attention_forward_backward_match_reference(n, h, length, s, e, m, c, topk, kpm_lengths, qpm_lengths,
                                                        dtype):
    q, k, v, kpm, a, attn, top, kk = _topk_case(n, h, length, s, e, m, c, topk, dtype, n * length, kpm_lengths,
                                                 qpm_lengths)
    scale = 0.3
    out, weights = OPS.topk_attention(q, k, v, a, top, kpm, scale)
    _, _, ref = _topk_products_reference(q, k, v, attn, a, kk, scale, kpm)
    ref = ref.masked_fill((a < 0)[..., None], 0.0)  # the reference gives padded queries row 0's
    assert rel_err(out, ref) < TOL[dtype]
    assert weights.shape == (n, h, length, kk)
    real = a >= 0
    assert torch.allclose(weights.sum(-1)[real], torch.ones((), dtype=dtype))
    assert bool((weights[~real] == 0).all())
    if kpm is not None:  # padded keys get weight 0
        kp = kpm[:, None, None, :].expand(n, h, c, s).gather(-1, top)  # (N, H, C, k)
        per_query = kp.gather(2, a.clamp_min(0)[..., None].expand(n, h, length, kk))
        assert bool((weights[per_query & real[..., None]] == 0).all())
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < TOL[dtype]


# ---------------------------------------------------------------------------------------------
# The fused inference operator topk_attention_combine (no autograd) against the two it replaces


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_attention_combine_matches_unfused_operators(dtype):
    """m̂·(top-k attention) + rest in one pass: as topk_attention then cluster_combine; padded queries 0."""
    n, h, length, s, e, m, c = 2, 3, 57, 41, 16, 12, 6
    q, k, v, kpm, a, _, top, _ = _topk_case(n, h, length, s, e, m, c, 7, dtype, 3, [s, 12], [length, 30])
    mass = torch.rand(n, h, c, generator=gen(4), dtype=dtype)
    rest = torch.randn(n, h, c, m, generator=gen(5), dtype=dtype)
    with torch.no_grad():
        got = OPS.topk_attention_combine(q, k, v, a, top, mass, rest, kpm, 0.3)
        want = OPS.cluster_combine(OPS.topk_attention(q, k, v, a, top, kpm, 0.3)[0], mass, rest, a)
        assert rel_err(got, want) < TOL[dtype]
        assert bool((got[a < 0] == 0).all()) and (a < 0).any()
        bad = rest.clone()
        cluster = int(a[1, 2, 0])
        bad[1, 2, cluster, 0] = float("nan")
        out = OPS.topk_attention_combine(q, k, v, a, top, mass, bad, kpm, 0.3)
    hit = a[1, 2] == cluster
    assert bool(out[1, 2][hit][:, 0].isnan().all()) and bool(out[1, 2][~hit].isfinite().all())


# ---------------------------------------------------------------------------------------------
# The attention functions, compiled against reference


CASES = [
    dict(n=2, h=3, length=37, s=37, e=16, m=12, clusters=6, topk=7, kpm=[37, 25], qpm=[37, 25]),
    dict(n=1, h=2, length=5, s=5, e=8, m=8, clusters=20, topk=3, kpm=None, qpm=None),  # L < C
    dict(n=1, h=1, length=1, s=9, e=4, m=6, clusters=4, topk=16, kpm=None, qpm=None),  # one query, topk > S
    dict(n=2, h=2, length=65, s=65, e=32, m=20, clusters=9, topk=65, kpm=[65, 40], qpm=[65, 40]),  # topk = S
    dict(n=2, h=2, length=30, s=47, e=16, m=16, clusters=5, topk=12, kpm=[47, 8], qpm=[30, 2]),  # cross lengths
]


def _case(case, op, dtype):
    """CASES[case] as inputs: q, k, v, the masks, the attention function and its extra options."""
    cfg = CASES[case]
    q, k, v = make_qkv(cfg["n"], cfg["h"], cfg["length"], cfg["s"], cfg["e"], cfg["m"], seed=case, dtype=dtype)
    kpm = None if cfg["kpm"] is None else padding_mask(cfg["kpm"], cfg["s"])
    qpm = None if cfg["qpm"] is None else padding_mask(cfg["qpm"], cfg["length"])
    fn = clustered_attention if op == "clustered" else improved_clustered_attention
    extra = {} if op == "clustered" else {"topk": cfg["topk"]}
    return cfg, q, k, v, kpm, qpm, fn, extra


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("op", ["clustered", "i_clustered"])
@pytest.mark.parametrize("hash_bits", [1, 63])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_compiled_matches_reference(case, op, hash_bits, dtype):
    cfg, q, k, v, kpm, qpm, fn, extra = _case(case, op, dtype)
    results = []
    for use in (False, True):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with compiled.use_compiled(use):
            out, info = fn(qq, kk, vv, clusters=cfg["clusters"], hash_bits=hash_bits, iterations=4, generator=gen(7),
                           key_padding_mask=kpm, query_padding_mask=qpm, return_clusters=True, **extra)  # fmt: skip
        g = torch.randn(out.shape, generator=gen(8), dtype=dtype)
        results.append((out, info, *torch.autograd.grad(out, (qq, kk, vv), g)))
    (ref, rinfo, *rgrads), (got, info, *grads) = results
    assert torch.equal(info.assignment, rinfo.assignment) and torch.equal(info.counts, rinfo.counts)
    assert rel_err(got, ref) < TOL[dtype]
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < TOL[dtype]
    if info.topk_mass is not None:
        assert rel_err(info.topk_mass, rinfo.topk_mass) < TOL[dtype]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("op", ["clustered", "i_clustered"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_path_matches_reference(case, op, dtype):
    """Without autograd, the compiled path runs the fused inference operators (centroid_topk, and
    topk_attention_combine for i-clustered): the same output and m̂ as the reference, and as the
    training path."""
    cfg, q, k, v, kpm, qpm, fn, extra = _case(case, op, dtype)
    kw = dict(clusters=cfg["clusters"], iterations=4, key_padding_mask=kpm, query_padding_mask=qpm,
              return_clusters=True, **extra)  # fmt: skip
    with torch.no_grad():
        with compiled.use_compiled(False):
            ref, rinfo = fn(q, k, v, generator=gen(7), **kw)
        got, info = fn(q, k, v, generator=gen(7), **kw)
    train, tinfo = fn(q.clone().requires_grad_(), k, v, generator=gen(7), **kw)
    assert torch.equal(info.assignment, rinfo.assignment)
    assert rel_err(got, ref) < TOL[dtype] and rel_err(got, train) < TOL[dtype]
    if op == "i_clustered":
        assert rel_err(info.topk_mass, rinfo.topk_mass) < TOL[dtype]
        assert rel_err(info.topk_mass, tinfo.topk_mass) < TOL[dtype]
    if qpm is not None:
        assert bool((got[qpm[:, None, :].expand_as(got[..., 0])] == 0).all())


def test_inference_path_with_atens_gemm():
    """FAIRSEQ_PLUGIN_CPU_BLAS=aten: centroid_topk's GEMMs through ATen (what a torch without the BLAS
    entry points gets) give the same result."""
    code = r"""
import torch
from fairseq_plugin.ops import improved_clustered_attention, compiled
assert compiled.load(), compiled.load_error()
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    q, k, v = (torch.randn(2, 3, n, 24, generator=g, dtype=dtype) for n in (150, 300, 300))
    kpm = torch.zeros(2, 300, dtype=torch.bool); kpm[1, 200:] = True
    res = []
    for use in (False, True):
        with torch.no_grad(), compiled.use_compiled(use):
            res.append(improved_clustered_attention(q, k, v, clusters=11, topk=20, key_padding_mask=kpm,
                                                    generator=torch.Generator().manual_seed(1)))
    err = float((res[0] - res[1]).abs().max() / res[0].abs().max())
    assert err < (2e-5 if dtype == torch.float32 else 1e-12), (dtype, err)
print("ok")
"""
    env = dict(os.environ, FAIRSEQ_PLUGIN_CPU_BLAS="aten")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


def test_gradcheck_operators_float64():
    n, h, length, s, e, m, c = 1, 2, 11, 13, 5, 4, 3
    a = _assignment(n, h, length, c, 3, [9])
    x = torch.randn(n, h, length, e, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, h, c, m, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: OPS.cluster_sum(t, a, c), (x,))
    assert torch.autograd.gradcheck(lambda t: OPS.cluster_broadcast(t, a), (y,))
    top = torch.randn(n, h, length, m, dtype=torch.float64, requires_grad=True)
    mass = torch.rand(n, h, c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: OPS.cluster_combine(*t, a), (top, mass, y))
    kpm = padding_mask([10], s)
    scores = torch.randn(n, h, c, s, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: OPS.softmax_topk(t, kpm, 4)[0], (scores,))
    q, k, v, kpm, a, attn, top, _ = _topk_case(n, h, length, s, e, m, c, 6, torch.float64, 5, [10], [9])
    assert torch.autograd.gradcheck(lambda *t: OPS.topk_attention(*t, a, top, kpm, 0.7)[0], (q, k, v))
    cen = torch.randn(n, h, c, e, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: OPS.centroid_attention(*t, kpm, 4, 0.6)[2:], (cen, k, v))


@pytest.mark.parametrize("op", ["clustered", "i_clustered"])
def test_gradcheck_attention_compiled_float64(op):
    """The whole compiled path (through m̂ too): fixed seed, so the clustering is the same each call."""
    q, k, v = make_qkv(2, 2, 13, 13, 6, 5, seed=4, dtype=torch.float64, requires_grad=True)
    kpm = padding_mask([13, 9], 13)
    fn = clustered_attention if op == "clustered" else improved_clustered_attention
    extra = {} if op == "clustered" else {"topk": 5}
    assert compiled.usable(q)

    def f(q, k, v):
        return fn(q, k, v, clusters=4, generator=gen(3), key_padding_mask=kpm, query_padding_mask=kpm, **extra)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck_every_operator():
    from torch.library import opcheck

    n, h, length, s, e, m, c = 2, 2, 11, 13, 5, 4, 3
    x = torch.randn(n, h, length, e)
    planes = draw_planes(9, e, generator=gen(0))
    opcheck(OPS.lsh_hash.default, (x, planes))
    codes = OPS.lsh_hash(x, planes)
    pad = padding_mask([length, 7], length)
    init, reseed = draw_kmeans_seeds(n, h, length, c, 3, pad, gen(1), x.device)
    opcheck(OPS.hamming_kmeans.default, (codes, init, reseed, pad, 9))
    a = _assignment(n, h, length, c, 2, [length, 7])
    opcheck(OPS.cluster_sum.default, (x.requires_grad_(), a, c))
    opcheck(OPS.cluster_broadcast.default, (torch.randn(n, h, c, m, requires_grad=True), a))
    top, mass = torch.randn(n, h, length, m, requires_grad=True), torch.rand(n, h, c, requires_grad=True)
    opcheck(OPS.cluster_combine.default, (top, mass, torch.randn(n, h, c, m, requires_grad=True), a))
    opcheck(OPS.cluster_combine_backward.default, (torch.randn(n, h, length, m), top.detach(), mass.detach(), a))
    kpm = padding_mask([s, 6], s)
    opcheck(OPS.softmax_topk.default, (torch.randn(n, h, c, s, requires_grad=True), kpm, 4))
    cen, kk_, vv_ = (torch.randn(n, h, x, y, requires_grad=True) for x, y in ((c, e), (s, e), (s, m)))
    opcheck(OPS.centroid_attention.default, (cen, kk_, vv_, kpm, 4, 0.5))
    attn, top, _, _ = OPS.centroid_attention(cen, kk_, vv_, kpm, 4, 0.5)
    opcheck(OPS.centroid_attention_backward.default, (torch.randn(n, h, c), torch.randn(n, h, c, m), attn, top,
                                                      cen.detach(), kk_.detach(), vv_.detach(), 0.5))  # fmt: skip
    opcheck(OPS.centroid_topk.default, (torch.randn(n, h, c, e), torch.randn(n, h, s, e), torch.randn(n, h, s, m), kpm,
                                        4, 0.5))  # fmt: skip
    q, k, v, kpm, a, _, top, _ = _topk_case(n, h, length, s, e, m, c, 4, torch.float32, 1, [s, 6], [length, 7])
    opcheck(OPS.topk_attention.default, (q, k, v, a, top, kpm, 0.5))
    opcheck(OPS.topk_attention_combine.default, (q.detach(), k.detach(), v.detach(), a, top, torch.rand(n, h, c),
                                                 torch.randn(n, h, c, m), kpm, 0.5))  # fmt: skip
    out, w = OPS.topk_attention(q, k, v, a, top, kpm, 0.5)
    opcheck(OPS.topk_attention_backward.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), a, top,
                                                  w.detach(), 0.5))  # fmt: skip


def test_torch_compile_traces_the_compiled_ops():
    q, k, v = make_qkv(1, 2, 40, 40, 8, 8, seed=2, requires_grad=True)

    def f(q, k, v):
        return improved_clustered_attention(q, k, v, clusters=5, topk=6, generator=gen(1)).square().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    traced = torch.compile(f, backend="aot_eager")
    got = torch.autograd.grad(traced(q, k, v), (q, k, v))
    for a, b in zip(got, eager):
        assert rel_err(a, b) < 1e-5
    with torch.no_grad():  # the inference path's fused operators
        assert rel_err(traced(q, k, v), f(q, k, v)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Robustness, reproducibility, fallback


def test_fuzz_random_shapes_and_masks():
    """Random shapes, masks and settings on the compiled path: no crash, finite outputs and gradients."""
    g = gen(2024)
    for trial in range(40):
        n, h = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(1, 90, (1,), generator=g))
        s = length if trial % 2 == 0 else int(torch.randint(1, 90, (1,), generator=g))
        e, m = (int(x) for x in torch.randint(1, 40, (2,), generator=g))
        kpm = torch.rand(n, s, generator=g) < float(torch.rand(1, generator=g)) * 0.8
        kpm[:, int(torch.randint(0, s, (1,), generator=g))] = False  # at least one real key per row
        qpm = (torch.rand(n, length, generator=g) < 0.3) if s == length else None
        q, k, v = (torch.randn(n, h, x, y, generator=g, requires_grad=True) for x, y in ((length, e), (s, e), (s, m)))
        kw = dict(clusters=int(torch.randint(1, 30, (1,), generator=g)), hash_bits=int(torch.randint(1, 64, (1,), generator=g)),
                  iterations=int(torch.randint(0, 6, (1,), generator=g)), key_padding_mask=kpm, query_padding_mask=qpm,
                  generator=gen(trial))  # fmt: skip
        fn = improved_clustered_attention if trial % 3 else clustered_attention
        extra = {"topk": int(torch.randint(1, 100, (1,), generator=g))} if trial % 3 else {}
        out = fn(q, k, v, **kw, **extra)
        assert out.shape == (n, h, length, m) and bool(torch.isfinite(out).all()), f"trial {trial}"
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(bool(torch.isfinite(t).all()) for t in grads), f"trial {trial}"
        if qpm is not None:
            assert bool((out[qpm[:, None, :].expand(n, h, length)] == 0).all())


@pytest.mark.parametrize("op", ["clustered", "i_clustered"])
def test_bit_reproducible_with_seed(op):
    q, k, v = make_qkv(2, 4, 300, 300, 32, 32, seed=11, requires_grad=True)
    kpm = padding_mask([300, 260], 300)
    fn = clustered_attention if op == "clustered" else improved_clustered_attention
    extra = {} if op == "clustered" else {"topk": 20}
    results = []
    for _ in range(2):
        out = fn(q, k, v, clusters=17, generator=gen(5), key_padding_mask=kpm, query_padding_mask=kpm, **extra)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_kernels_are_independent_of_the_thread_count():
    """Our kernels split work so that no sum depends on the thread count (the GEMMs around them are
    MKL's, whose last bits may change with the thread count; the centroid attention's GEMMs run
    single-threaded inside its tasks, so with at least as many (n, h) as threads they do not)."""
    n, h, length, s, e, m, c = 2, 3, 400, 380, 24, 20, 13
    q, k, v, kpm, a, _, top, _ = _topk_case(n, h, length, s, e, m, c, 16, torch.float32, 9, [s, 200], [length, 350])
    codes, init, reseed, pad = _kmeans_inputs(n, h, length, c, 6, 63, 3, [length, 350])
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out, w = OPS.topk_attention(q, k, v, a, top, kpm, 0.4)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            sums = OPS.cluster_sum(q.detach(), a, c)
            cen = q[:, :, :c].detach().clone().requires_grad_()  # (N, H, C, E): as many heads as threads or more
            centroid = OPS.centroid_attention(cen, k, v, kpm, 16, 0.4)
            centroid_grads = torch.autograd.grad(centroid[2].sum() + centroid[3].square().sum(), (cen, k, v))
            results.append((out, w, *grads, sums, *OPS.hamming_kmeans(codes, init, reseed, pad, 63),
                            OPS.softmax_topk(torch.randn(n, h, c, s, generator=gen(0)), kpm, 16)[1],
                            *centroid, *centroid_grads, *OPS.centroid_topk(cen, k, v, kpm, 16, 0.4)))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_missing_extension_falls_back_loudly_once():
    """With the extension unloadable, every op runs the reference, and one warning says why and how to fix it."""
    code = r"""
import importlib, warnings, torch
real = importlib.import_module
def broken(name, *a, **k):
    if name == "fairseq_plugin._C":
        raise ImportError("undefined symbol: _ZN3c10 (simulated)")
    return real(name, *a, **k)
importlib.import_module = broken
from fairseq_plugin.ops import improved_clustered_attention, compiled
q = torch.randn(1, 2, 30, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = improved_clustered_attention(q, q, q, clusters=4, topk=5, generator=torch.Generator().manual_seed(0))
    b = improved_clustered_attention(q, q, q, clusters=4, topk=5, generator=torch.Generator().manual_seed(0))
messages = [str(w.message) for w in caught if "compiled clustered-attention ops are unavailable" in str(w.message)]
assert len(messages) == 1, messages
assert "undefined symbol" in messages[0] and "pip install --no-build-isolation -e ." in messages[0], messages[0]
assert compiled.load() is False and torch.equal(a, b)
importlib.import_module = real
with compiled.use_compiled(False):
    pass
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_a_registration_bug_is_raised_not_reported_as_unavailable():
    """Only a failed import means "unavailable": an error in our own fakes/autograd code surfaces."""
    code = r"""
from fairseq_plugin.ops import compiled
def broken():
    raise TypeError("bug in a fake kernel (simulated)")
compiled._register_python_parts = broken
try:
    compiled.load()
except TypeError as err:
    print("raised:", err)
else:
    print("swallowed:", compiled.load_error())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and "raised: bug in a fake kernel" in done.stdout, done.stdout + done.stderr[-2000:]


def test_fallback_matches_compiled_in_a_fresh_process():
    """FAIRSEQ_PLUGIN_COMPILED=0 selects the reference deliberately, silently, with the same result."""
    code = (
        "import torch, warnings; warnings.simplefilter('error', RuntimeWarning);"
        "from fairseq_plugin.ops import improved_clustered_attention as f, compiled;"
        "q = torch.randn(2, 2, 50, 8, generator=torch.Generator().manual_seed(1));"
        "out = f(q, q, q, clusters=6, topk=7, generator=torch.Generator().manual_seed(2));"
        "assert not compiled.enabled(); torch.save(out, 'OUT')"
    )
    outs = []
    for flag in ("0", "1"):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fca_fallback_{os.getpid()}_{flag}.pt"
        env = dict(os.environ, FAIRSEQ_PLUGIN_COMPILED=flag)
        script = code.replace("OUT", str(path)) if flag == "0" else code.replace("assert not", "assert").replace("OUT", str(path))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(torch.load(path, weights_only=True))
        path.unlink()
    assert rel_err(outs[0], outs[1]) < 2e-5


def test_bad_input_errors_name_the_argument():
    q = torch.randn(1, 2, 10, 4)
    a = torch.zeros(1, 2, 10, dtype=torch.long)
    with pytest.raises(RuntimeError, match="assignment must have shape"):
        OPS.cluster_sum(q, a[:, :, :5], 3)
    with pytest.raises(RuntimeError, match=r"rest must have shape \(N, H, C, M\) = \(1, 2, 3, 4\)"):
        OPS.cluster_combine(q, torch.ones(1, 2, 3), torch.ones(1, 2, 4, 4), a)
    with pytest.raises(RuntimeError, match="assignment holds cluster 5 >= clusters = 3"):
        OPS.cluster_combine(q, torch.ones(1, 2, 3), torch.ones(1, 2, 3, 4), a + 5)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        OPS.cluster_sum(q.to(torch.int32), a, 3)
    with pytest.raises(RuntimeError, match="hash_bits .* must be in 1..63"):
        OPS.lsh_hash(q, torch.randn(64, 5))
    with pytest.raises(RuntimeError, match="planes must have shape"):
        OPS.lsh_hash(q, torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="init holds positions outside"):
        OPS.hamming_kmeans(torch.zeros(1, 2, 10, dtype=torch.long), torch.full((1, 2, 3), 10), torch.zeros(1, 1, 2, 3, dtype=torch.long), None, 8)
    with pytest.raises(RuntimeError, match="top holds key indices outside"):
        OPS.topk_attention(q, q, q, a, torch.full((1, 2, 1, 2), 10), None, 1.0)
    with pytest.raises(RuntimeError, match="topk must be >= 1"):
        OPS.softmax_topk(torch.randn(1, 2, 3, 10), None, 0)
    cen, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 5)
    attn, top = torch.rand(1, 2, 3, 10), torch.zeros(1, 2, 3, 4, dtype=torch.long)
    gm, gr = torch.ones(1, 2, 3), torch.ones(1, 2, 3, 5)
    with pytest.raises(RuntimeError, match="top holds key index 10 outside 0..S-1 = 0..9"):
        OPS.centroid_attention_backward(gm, gr, attn, top + 10, cen, k, v, 0.5)
    with pytest.raises(RuntimeError, match="top holds key index -1 outside"):
        OPS.centroid_attention_backward(gm, gr, attn, top - 1, cen, k, v, 0.5)
    with pytest.raises(RuntimeError, match=r"attn must have shape \(N, H, C, S\) = \(1, 2, 3, 10\)"):
        OPS.centroid_attention_backward(gm, gr, attn[..., :5], top, cen, k, v, 0.5)
    with pytest.raises(RuntimeError, match="grad_rest must have shape"):
        OPS.centroid_attention_backward(gm, gr.double(), attn, top, cen, k, v, 0.5)
    with pytest.raises(RuntimeError, match=r"k must have shape \(N, H, S, E\) = \(1, 2, S, 4\)"):
        OPS.centroid_topk(cen, k[..., :3], v, None, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"v must have shape \(N, H, S, M\) = \(1, 2, 10, M\)"):
        OPS.centroid_topk(cen, k, v[:, :, :9], None, 4, 0.5)
    with pytest.raises(RuntimeError, match="centroids, k and v must share one dtype"):
        OPS.centroid_topk(cen, k.double(), v, None, 4, 0.5)
    with pytest.raises(RuntimeError, match="topk must be >= 0"):
        OPS.centroid_topk(cen, k, v, None, -1, 0.5)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \(N, S\) = \(1, 10\)"):
        OPS.centroid_topk(cen, k, v, torch.zeros(1, 9, dtype=torch.bool), 4, 0.5)
    with pytest.raises(RuntimeError, match=r"rest must have shape \(N, H, C, M\) = \(1, 2, 1, 4\)"):
        OPS.topk_attention_combine(q, q, q, a, torch.zeros(1, 2, 1, 2, dtype=torch.long), torch.ones(1, 2, 1),
                                   torch.ones(1, 2, 1, 5), None, 1.0)  # fmt: skip


@pytest.mark.parametrize("isa", ["default", "avx2", "best"])
def test_every_cpu_variant_matches_reference(isa):
    """The kernels carry AVX-512, AVX2 and baseline variants chosen at run time; this machine runs
    the best one, so the others are checked here with FAIRSEQ_PLUGIN_CPU_ISA capping the choice."""
    code = r"""
import torch
from fairseq_plugin.ops import clustered_attention, improved_clustered_attention, compiled
assert compiled.load(), compiled.load_error()
g = torch.Generator().manual_seed(0)
for length, e, topk in ((300, 64, 32), (77, 19, 9), (150, 40, 57)):
    q, k, v = (torch.randn(2, 3, length, e, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.zeros(2, length, dtype=torch.bool); kpm[1, length // 2:] = True
    for fn, extra in ((clustered_attention, {}), (improved_clustered_attention, {"topk": topk})):
        for dtype in (torch.float32, torch.float64):
            res = []
            for use in (False, True):
                qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
                with compiled.use_compiled(use):
                    out, info = fn(qq, kk, vv, clusters=11, generator=torch.Generator().manual_seed(1),
                                   key_padding_mask=kpm, query_padding_mask=kpm, return_clusters=True, **extra)
                res.append((out, info.assignment, *torch.autograd.grad(out.square().sum(), (qq, kk, vv))))
            with torch.no_grad():  # the inference path (fused operators for i-clustered)
                out = fn(q.to(dtype), k.to(dtype), v.to(dtype), clusters=11, generator=torch.Generator().manual_seed(1),
                         key_padding_mask=kpm, query_padding_mask=kpm, **extra)
            res.append((out, res[1][1]))
            assert torch.equal(res[0][1], res[1][1]), "assignments differ"
            for a, b in zip(res[0][:1] + res[0][2:] + res[0][:1], res[1][:1] + res[1][2:] + res[2][:1]):
                err = float((a - b).abs().max() / b.abs().max())
                assert err < (2e-5 if dtype == torch.float32 else 1e-12), (fn.__name__, dtype, err)
# k-means alone, bit for bit: codes around a few centres (the passes after the first compare most
# queries with the changed centroids only), random codes, a handful of distinct codes (clusters
# empty out and are re-seeded), padding, lengths that are not a multiple of the SIMD block, and
# more than 128 centroids (the AVX2 block scan's chunks, with distance ties across them).
from fairseq_plugin.ops.hashing import draw_planes, lsh_hash, pack_bits
from fairseq_plugin.ops.kmeans import draw_kmeans_seeds, kmeans_from_seeds
for n, h, length, c, iterations, bits, kind in ((1, 4, 1024, 100, 10, 63, "centres"), (2, 3, 517, 37, 12, 20, "centres"),
                                                (1, 2, 301, 50, 15, 63, "few"), (3, 1, 129, 16, 20, 8, "random"),
                                                (1, 1, 7, 3, 4, 63, "random"), (1, 1, 1100, 270, 5, 12, "random"),
                                                (1, 2, 700, 140, 8, 63, "centres")):
    if kind == "centres":
        centres = torch.randn(h, 40, 64, generator=g)
        x = centres[:, torch.randint(0, 40, (length,), generator=g)] + 0.3 * torch.randn(h, length, 64, generator=g)
        codes = lsh_hash(x.expand(n, h, length, 64).contiguous(), draw_planes(bits, 64, True, g))
    else:
        pool = pack_bits(torch.rand(5 if kind == "few" else n * h * length, bits, generator=g) < 0.5)
        codes = pool[torch.randint(0, pool.shape[0], (n, h, length), generator=g)]
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[-1, 2 * length // 3:] = True
    for mask in (None, pad):
        init, reseed = draw_kmeans_seeds(n, h, length, c, iterations, pad if mask is not None else pad & False, g,
                                         codes.device)
        got = torch.ops.fairseq_clustered.hamming_kmeans(codes, init, reseed, mask, bits)
        want = kmeans_from_seeds(codes, bits, init, reseed, mask)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), ("kmeans", n, h, length, c, kind, mask is not None)
# softmax_topk on long rows (the group-maxima bound), padded or not, with exact ties: attn close to
# ATen's softmax, top exactly the stable ranking of attn.
x = torch.randn(2, 2, 3, 8192, generator=g)
x[..., 5::9] = x[..., 5:6]
kpm = torch.rand(2, 8192, generator=g) < 0.3
for dtype in (torch.float32, torch.float64):
    for mask in (None, kpm):
        for kk in (1, 32, 300):
            attn, top = torch.ops.fairseq_clustered.softmax_topk(x.to(dtype), mask, kk)
            xm = x.to(dtype) if mask is None else x.to(dtype).masked_fill(mask[:, None, None], float("-inf"))
            assert float((attn - torch.softmax(xm, -1)).abs().max()) < 2e-5, ("softmax_topk", dtype, kk)
            rank = attn if mask is None else attn.masked_fill(mask[:, None, None], -1.0)
            assert torch.equal(top, rank.sort(dim=-1, descending=True, stable=True).indices[..., :kk]), ("top", dtype, kk)
# centroid_attention's backward (the softmax's in place: vectors plus a scalar tail), one head (the
# forward splits it into blocks for the threads): against autograd through ATen's softmax.
for s_len, m, heads in ((300, 64, 3), (77, 19, 1), (16, 33, 2)):
    cen = torch.randn(2, heads, 5, 24, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, heads, s_len, 24, generator=g, dtype=torch.float64, requires_grad=True)
    val = torch.randn(2, heads, s_len, m, generator=g, dtype=torch.float64, requires_grad=True)
    attn, top, mass, rest = torch.ops.fairseq_clustered.centroid_attention(cen, key, val, None, 9, 0.4)
    a_ = torch.softmax((cen * 0.4) @ key.transpose(-1, -2), -1)
    g_rest = torch.randn_like(rest)
    ref = torch.autograd.grad((a_.gather(-1, top).sum(-1) * 3).sum() + ((a_.scatter(-1, top, 0.0) @ val) * g_rest).sum(),
                              (cen, key, val))
    got = torch.autograd.grad((mass * 3 + (rest * g_rest).sum(-1)).sum(), (cen, key, val))
    assert all(float((a - b).abs().max() / b.abs().max()) < 1e-12 for a, b in zip(got, ref)), "centroid_attention_bwd"
# lsh_hash's packing (8 / 16 thresholds a compare, a scalar or masked tail), NaN projections giving 0
# bits as `>` does, bit for bit with the reference.
from fairseq_plugin.ops.hashing import hash_bits_of
x = torch.randn(2, 3, 37, 24, generator=g)
x[0, 1, 5, 3] = float("nan")
x[1, 0, 7] = float("inf")
for bits in (1, 7, 8, 15, 16, 17, 33, 63):
    planes = draw_planes(bits, 24, True, g)
    for dtype in (torch.float32, torch.float64):
        got = torch.ops.fairseq_clustered.lsh_hash(x.to(dtype), planes)
        assert torch.equal(got, pack_bits(hash_bits_of(x.to(dtype), planes))), ("lsh_hash", bits, dtype)
torch.set_num_threads(1)  # the other parallel split of k-means: whole rows per thread vs queries of a row
codes = lsh_hash(torch.randn(2, 1, 700, 64, generator=g), draw_planes(63, 64, True, g))
init, reseed = draw_kmeans_seeds(2, 1, 700, 30, 8, torch.zeros(2, 700, dtype=torch.bool), g, codes.device)
got = torch.ops.fairseq_clustered.hamming_kmeans(codes, init, reseed, None, 63)
assert all(torch.equal(a, b) for a, b in zip(got, kmeans_from_seeds(codes, 63, init, reseed, None)))
print(torch.ops.fairseq_clustered.cpu_isa())
print("ok")
"""
    env = dict(os.environ, FAIRSEQ_PLUGIN_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    ran = done.stdout.split()[-2]  # the variant the kernels ran (the op cpu_isa)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = set(" ".join(line for line in cpuinfo if line.startswith("flags")).split())
    if isa == "default" or (isa == "avx2" and "avx2" in flags):
        assert ran == isa, ran
    else:
        assert ran in ("avx512", "avx2", "default"), ran
