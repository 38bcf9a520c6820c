"""Reproducibility from one torch.Generator, and the LSH bit layout."""

from __future__ import annotations

import pytest
import torch

from fairseq_plugin.ops import (
    clustered_attention,
    draw_planes,
    hamming_kmeans,
    improved_clustered_attention,
    lsh_hash,
)

from . import gen, make_qkv, padding_mask

N, H, L, S, E, M = 2, 3, 37, 41, 16, 12
KPM = padding_mask([S, 25], S, left=[False, True])
QPM = padding_mask([L - 5, L], L)


def run(op, seed, q, k, v, clusters=6, **kw):
    fn = clustered_attention if op == "clustered" else improved_clustered_attention
    extra = {} if op == "clustered" else {"topk": 7}
    return fn(q, k, v, clusters=clusters, key_padding_mask=KPM, query_padding_mask=QPM,
              generator=None if seed is None else gen(seed), return_clusters=True, **extra, **kw)


def infos_equal(a, b):
    return (torch.equal(a.assignment, b.assignment) and torch.equal(a.counts, b.counts)
            and ((a.topk_mass is None and b.topk_mass is None) or torch.equal(a.topk_mass, b.topk_mass)))


def few_distinct_queries(seed):
    """Queries with only 3 distinct values per (n, h): with 8 clusters, k-means empties clusters and
    re-seeds them from the generator at every iteration."""
    g = gen(seed)
    base = torch.randn(N, H, 3, E, generator=g)
    return base.repeat_interleave(13, dim=2)[:, :, :L]


@pytest.mark.parametrize("hash_bias", [True, False])
@pytest.mark.parametrize("data,clusters", [("iid", 6), ("iid", 30), ("few", 8)])
@pytest.mark.parametrize("op", ["clustered", "iclustered"])
def test_same_seed_bit_identical(op, data, clusters, hash_bias):
    q, k, v = make_qkv(N, H, L, S, E, M, seed=0)
    if data == "few":
        q = few_distinct_queries(1)
    state = torch.get_rng_state()
    try:
        # the global RNG is in a different state for each call: only the generator may matter
        torch.manual_seed(1)
        out1, info1 = run(op, 123, q, k, v, hash_bias=hash_bias, clusters=clusters)
        torch.manual_seed(2)
        out2, info2 = run(op, 123, q, k, v, hash_bias=hash_bias, clusters=clusters)
    finally:
        torch.set_rng_state(state)
    assert torch.equal(out1, out2)
    assert infos_equal(info1, info2)
    # a generator is consumed: calling twice with the SAME generator object continues its stream
    if data == "iid":
        g = gen(123)
        fn = clustered_attention if op == "clustered" else improved_clustered_attention
        _, ia = fn(q, k, v, clusters=clusters, generator=g, return_clusters=True, hash_bias=hash_bias)
        _, ib = fn(q, k, v, clusters=clusters, generator=g, return_clusters=True, hash_bias=hash_bias)
        assert not torch.equal(ia.assignment, ib.assignment)


def test_kmeans_ties_go_to_lowest_cluster():
    """All codes equal: every centroid is that code, every distance ties, so all queries go to cluster 0."""
    codes = torch.full((N, H, L), 0b1011, dtype=torch.int64)
    qpm = padding_mask([L, 20], L)
    a, c = hamming_kmeans(codes, hash_bits=4, clusters=5, iterations=3, padding_mask=qpm, generator=gen(0))
    expected = torch.zeros(N, H, L, dtype=torch.int64).masked_fill(qpm[:, None, :], -1)
    assert torch.equal(a, expected)
    assert torch.equal(c, torch.tensor([L, 0, 0, 0, 0]).repeat(N, H, 1).masked_fill(
        torch.tensor([False, True])[:, None, None] & (torch.arange(5) == 0), 20))


@pytest.mark.parametrize("op", ["clustered", "iclustered"])
def test_different_seeds_differ(op):
    q, k, v = make_qkv(N, H, L, S, E, M, seed=1)  # iid inputs
    results = [run(op, seed, q, k, v) for seed in range(5)]
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    differing = sum(not torch.equal(results[i][1].assignment, results[j][1].assignment) for i, j in pairs)
    assert differing >= len(pairs) - 1, f"only {differing} of {len(pairs)} seed pairs gave different clusters"
    assert not torch.equal(results[0][0], results[1][0])


@pytest.mark.parametrize("op", ["clustered", "iclustered"])
def test_global_rng_when_no_generator(op):
    q, k, v = make_qkv(N, H, L, S, E, M, seed=2)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(77)
        out1, info1 = run(op, None, q, k, v)
        torch.manual_seed(77)
        out2, info2 = run(op, None, q, k, v)
        torch.manual_seed(78)
        out3, info3 = run(op, None, q, k, v)
    finally:
        torch.set_rng_state(state)
    assert torch.equal(out1, out2) and infos_equal(info1, info2)
    assert not torch.equal(info1.assignment, info3.assignment)


def test_hamming_kmeans_reproducible():
    codes = torch.randint(0, 2**20, (N, H, L), generator=gen(3), dtype=torch.int64)
    qpm = padding_mask([L, 30], L)
    a1, c1 = hamming_kmeans(codes, hash_bits=20, clusters=5, iterations=4, padding_mask=qpm, generator=gen(9))
    a2, c2 = hamming_kmeans(codes, hash_bits=20, clusters=5, iterations=4, padding_mask=qpm, generator=gen(9))
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    assert torch.equal(a1 == -1, qpm[:, None, :].expand(N, H, L))
    torch.testing.assert_close(c1.sum(-1), (~qpm).sum(-1, keepdim=True).expand(N, H))


@pytest.mark.parametrize("n,h,length,clusters,iterations", [(2, 3, 37, 6, 5), (1, 4, 8192, 100, 10), (1, 1, 5, 5, 0)])
def test_kmeans_seeds_without_a_mask_are_those_of_an_all_false_mask(n, h, length, clusters, iterations):
    """No padding mask skips sorting the positions, and draws the same seeds from the same stream."""
    from fairseq_plugin.ops.kmeans import draw_kmeans_seeds

    got = draw_kmeans_seeds(n, h, length, clusters, iterations, None, gen(4), torch.device("cpu"))
    want = draw_kmeans_seeds(n, h, length, clusters, iterations, torch.zeros(n, length, dtype=torch.bool), gen(4),
                             torch.device("cpu"))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_draw_planes_reproducible():
    p1 = draw_planes(17, E, True, gen(5), "cpu")
    p2 = draw_planes(17, E, True, gen(5), "cpu")
    assert p1.shape == (17, E + 1)
    assert torch.equal(p1, p2)
    assert not torch.equal(p1, draw_planes(17, E, True, gen(6), "cpu"))
    assert bool((p1[:, E] != 0).all())


def bits_reference(x, planes, hash_bits):
    """(bits (..., B) bool, clear (..., B) bool): [a[:E]·x > a[E]] in float64, and whether the margin is
    large enough that float32 rounding cannot flip the bit."""
    a = planes[:, :E].double()
    b = planes[:, E].double()
    proj = x.double() @ a.T  # (..., B)
    return proj > b, (proj - b).abs() > 1e-4


@pytest.mark.parametrize("hash_bits", [1, 2, 31, 63])
@pytest.mark.parametrize("hash_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lsh_hash_bits_lsb_first(hash_bits, hash_bias, dtype):
    """Bit b of the int64 code is [a_b[:E]·x > a_b[E]] (threshold 0 without hash bias): LSB first."""
    x = torch.randn(N, H, L, E, generator=gen(11), dtype=dtype)
    planes = draw_planes(hash_bits, E, hash_bias, gen(hash_bits), "cpu")
    assert planes.shape == (hash_bits, E + 1)
    if not hash_bias:
        assert torch.equal(planes[:, E], torch.zeros(hash_bits, dtype=planes.dtype))
    codes = lsh_hash(x, planes)
    assert codes.shape == (N, H, L) and codes.dtype == torch.int64
    assert bool((codes >= 0).all()) and bool(((codes >> hash_bits) == 0).all())  # only bits 0..B-1
    ref_bits, clear = bits_reference(x, planes, hash_bits)
    assert float(clear.double().mean()) > 0.99
    flat_codes = codes.flatten().tolist()
    flat_bits = ref_bits.reshape(-1, hash_bits).tolist()
    flat_clear = clear.reshape(-1, hash_bits).tolist()
    for code, bits, ok in zip(flat_codes, flat_bits, flat_clear):
        for b in range(hash_bits):
            if ok[b]:
                assert ((code >> b) & 1) == int(bits[b]), f"bit {b} of code {code:#x}"
    # both bit values occur (the hash is not degenerate)
    if hash_bits >= 2:
        assert ref_bits.any() and (~ref_bits).any()
        assert len(set(flat_codes)) > 1


def test_lsh_hash_is_scale_invariant_without_bias():
    """Without the bias every plane passes through 0: positive rescaling keeps the code."""
    x = torch.randn(4, 7, E, generator=gen(12), dtype=torch.float64)
    planes = draw_planes(63, E, False, gen(13), "cpu")
    torch.testing.assert_close(lsh_hash(x, planes), lsh_hash(3.5 * x, planes))
    # popcount distance between x and -x is the number of planes (every bit flips)
    flipped = lsh_hash(x, planes) ^ lsh_hash(-x, planes)
    assert all(bin(c).count("1") == 63 for c in flipped.flatten().tolist())
