"""Forward oracles: each op against an independent float64 reference (DESIGN.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from fairseq_plugin.ops import (
    ClusterInfo,
    HardmaxInfo,
    clustered_attention,
    full_attention,
    hardmax_attention,
    improved_clustered_attention,
)

from . import (
    gen,
    hardmax_layer_ref,
    make_qkv,
    padding_mask,
    ref_clustered_from_assignment,
    ref_full,
    ref_hardmax,
    ref_hardmax_sets,
    rel_err,
    strict_leaders,
)

N, H, L, S, E, M = 2, 3, 37, 41, 16, 12


def repeated_queries(n, h, length, e, distinct, *, seed):
    """Queries (n, h, length, e) that take only `distinct` values per (n, h), in a shuffled order.

    Returns (q, which) where which[b, hh, i] is the index of the distinct vector of query i."""
    g = gen(seed)
    base = torch.randn(n, h, distinct, e, generator=g, dtype=torch.float64) * 2.0
    which = torch.stack([
        torch.stack([
            torch.randperm(length, generator=g) % distinct for _ in range(h)
        ]) for _ in range(n)
    ])  # every distinct value occurs at least length // distinct times
    q = base.gather(2, which.unsqueeze(-1).expand(n, h, length, e))
    return q, which


# ---------------------------------------------------------------------------------------------
# full attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softmax_temp", [None, 0.37])
@pytest.mark.parametrize("masked", [False, True])
def test_full_attention_matches_hand_written_softmax_float64(softmax_temp, masked):
    q, k, v = make_qkv(N, H, L, S, E, M, seed=1, dtype=torch.float64)
    kpm = padding_mask([S - 3, 17], S, left=[False, True]) if masked else None
    qpm = padding_mask([L, L - 5], L) if masked else None
    got = full_attention(q, k, v, softmax_temp=softmax_temp, key_padding_mask=kpm, query_padding_mask=qpm)
    ref = ref_full(q, k, v, tau=softmax_temp, key_padding_mask=kpm, query_padding_mask=qpm)
    assert got.shape == (N, H, L, M) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if masked:
        assert torch.equal(got[1, :, L - 5:], torch.zeros_like(got[1, :, L - 5:]))


def test_full_attention_default_temperature_is_inverse_sqrt_e():
    q, k, v = make_qkv(1, 2, 5, 6, 9, 4, seed=2, dtype=torch.float64)
    torch.testing.assert_close(full_attention(q, k, v), full_attention(q, k, v, softmax_temp=1 / 3))
    # and a different temperature really changes the result
    assert rel_err(full_attention(q, k, v, softmax_temp=1.0), full_attention(q, k, v)) > 1e-3


# ---------------------------------------------------------------------------------------------
# improved clustered == full when top-k covers every real key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [S, S + 7, 1000])
@pytest.mark.parametrize("lengths", [(S, S), (S - 1, 29), (38, 40)])
def test_iclustered_topk_ge_s_equals_full(topk, lengths):
    q, k, v = make_qkv(N, H, L, S, E, M, seed=3)
    kpm = padding_mask(lengths, S, left=[False, True])
    qpm = padding_mask([L - 4, L], L)
    out, info = improved_clustered_attention(
        q, k, v, clusters=5, topk=topk, key_padding_mask=kpm, query_padding_mask=qpm,
        generator=gen(0), return_clusters=True,
    )
    ref = ref_full(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
    assert out.shape == (N, H, L, M) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, full_attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)) <= 1e-5
    assert torch.equal(out[0, :, L - 4:], torch.zeros_like(out[0, :, L - 4:]))
    # every cluster's top-k covers all of its keys: m̂ = 1 where the cluster is non-empty
    nonempty = info.counts > 0
    torch.testing.assert_close(info.topk_mass[nonempty], torch.ones_like(info.topk_mass[nonempty]))


@pytest.mark.parametrize("n_real", [1, 7, 11])
def test_iclustered_exact_on_rows_where_topk_exceeds_real_keys(n_real):
    """topk < S, but a batch row with fewer real keys than topk must be exact (no padded key may take a
    top-k slot from a real key, and padded keys get no weight), whatever the other rows look like."""
    topk = 12
    n = 3
    q, k, v = make_qkv(n, H, L, S, E, M, seed=4)
    kpm = padding_mask([S, n_real, 30], S, left=[False, True, False])
    out = improved_clustered_attention(q, k, v, clusters=4, topk=topk, key_padding_mask=kpm, generator=gen(1))
    ref = ref_full(q, k, v, key_padding_mask=kpm)
    assert rel_err(out[1], ref[1]) <= 1e-5
    # rows with more real keys than topk are approximations, not exact (the test above is not vacuous)
    assert rel_err(out[0], ref[0]) > 1e-4


@pytest.mark.parametrize("topk", [3, 10])
@pytest.mark.parametrize("clusters", [4, 9])
def test_iclustered_topk_lt_s_matches_reference_for_its_assignment(topk, clusters):
    q, k, v = make_qkv(N, 2, 23, 19, 8, 5, seed=5, dtype=torch.float64)
    kpm = padding_mask([19, 12], 19, left=[False, True])
    qpm = padding_mask([23, 20], 23)
    out, info = improved_clustered_attention(
        q, k, v, clusters=clusters, topk=topk, key_padding_mask=kpm, query_padding_mask=qpm,
        generator=gen(2), return_clusters=True,
    )
    assert isinstance(info, ClusterInfo)
    assert info.counts.shape == (N, 2, clusters)
    ref, mhat = ref_clustered_from_assignment(
        q, k, v, info.assignment, clusters, topk=topk, key_padding_mask=kpm, query_padding_mask=qpm
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    nonempty = info.counts > 0
    torch.testing.assert_close(info.topk_mass[nonempty], mhat[nonempty], rtol=1e-10, atol=1e-10)
    assert bool((info.topk_mass[nonempty] <= 1 + 1e-12).all())


@pytest.mark.parametrize("clusters", [3, 8])
def test_clustered_matches_reference_for_its_assignment(clusters):
    q, k, v = make_qkv(N, 2, 23, 19, 8, 5, seed=6, dtype=torch.float64)
    kpm = padding_mask([19, 12], 19, left=[True, False])
    qpm = padding_mask([21, 23], 23)
    out, info = clustered_attention(
        q, k, v, clusters=clusters, softmax_temp=0.6, key_padding_mask=kpm, query_padding_mask=qpm,
        generator=gen(3), return_clusters=True,
    )
    assert info.topk_mass is None
    ref, _ = ref_clustered_from_assignment(
        q, k, v, info.assignment, clusters, tau=0.6, key_padding_mask=kpm, query_padding_mask=qpm
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# clustered == full on queries with <= C distinct values
# ---------------------------------------------------------------------------------------------


def check_cluster_info(info, which, qpm, n_clusters):
    n, h, length = which.shape
    assert info.assignment.shape == (n, h, length) and info.assignment.dtype == torch.int64
    assert info.counts.shape == (n, h, n_clusters) and info.counts.dtype == torch.int64
    padded = qpm[:, None, :].expand(n, h, length)
    assert torch.equal(info.assignment == -1, padded), "assignment must be -1 exactly on padded queries"
    real = ~padded
    assert bool(((info.assignment[real] >= 0) & (info.assignment[real] < n_clusters)).all())
    torch.testing.assert_close(info.counts.sum(-1), real.sum(-1))
    # counts agree with the assignment
    for c in range(n_clusters):
        assert torch.equal(info.counts[..., c], (info.assignment == c).sum(-1))
    for b in range(n):
        for hh in range(h):
            r = real[b, hh]
            a, w = info.assignment[b, hh][r], which[b, hh][r]
            same_vec = w[:, None] == w[None, :]
            same_cluster = a[:, None] == a[None, :]
            # identical queries share a cluster (their codes are identical) ...
            assert bool(same_cluster[same_vec].all()), "identical queries were split across clusters"
            # ... and, with more clusters than distinct queries, a cluster holds only identical queries
            assert bool(same_vec[same_cluster].all()), "a cluster mixes distinct queries"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("op", ["clustered", "iclustered"])
def test_clustered_equals_full_on_few_distinct_queries(op, seed):
    q, which = repeated_queries(N, H, L, E, 5, seed=10 + seed)
    q = q.float()
    _, k, v = make_qkv(N, H, L, S, E, M, seed=20 + seed)
    kpm = padding_mask([S - 6, S], S, left=[True, False])
    qpm = padding_mask([L, L - 3], L)
    kw = dict(clusters=8, iterations=12, hash_bits=63, key_padding_mask=kpm, query_padding_mask=qpm,
              generator=gen(seed), return_clusters=True)
    if op == "clustered":
        out, info = clustered_attention(q, k, v, **kw)
        assert info.topk_mass is None
    else:  # topk < S: still exact, because every centroid equals each of its members
        out, info = improved_clustered_attention(q, k, v, topk=5, **kw)
        assert info.topk_mass.shape == (N, H, 8)
    check_cluster_info(info, which, qpm, 8)
    ref = ref_full(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(out[1, :, L - 3:], torch.zeros_like(out[1, :, L - 3:]))


# ---------------------------------------------------------------------------------------------
# fewer queries than clusters, a single query
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["clustered", "iclustered"])
def test_fewer_queries_than_clusters(op):
    length = 5
    q, k, v = make_qkv(N, H, length, S, E, M, seed=7, dtype=torch.float64)
    qpm = padding_mask([length, 3], length)
    fn = clustered_attention if op == "clustered" else improved_clustered_attention
    kw = {} if op == "clustered" else {"topk": 6}
    out, info = fn(q, k, v, clusters=8, query_padding_mask=qpm, generator=gen(4), return_clusters=True, **kw)
    assert out.shape == (N, H, length, M)
    assert info.counts.shape == (N, H, length), "counts must have C = min(clusters, L) columns"
    torch.testing.assert_close(info.counts.sum(-1), torch.tensor([[length] * H, [3] * H]))
    assert torch.equal(info.assignment == -1, qpm[:, None, :].expand(N, H, length))
    ref, _ = ref_clustered_from_assignment(q, k, v, info.assignment, length, topk=kw.get("topk"),
                                           query_padding_mask=qpm)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op,topk", [("clustered", None), ("iclustered", 3), ("iclustered", 64)])
@pytest.mark.parametrize("clusters", [1, 8])
def test_single_query_equals_full(op, topk, clusters):
    q, k, v = make_qkv(N, H, 1, S, E, M, seed=8)
    kpm = padding_mask([S, 9], S)
    if op == "clustered":
        out, info = clustered_attention(q, k, v, clusters=clusters, key_padding_mask=kpm, generator=gen(5),
                                        return_clusters=True)
    else:
        out, info = improved_clustered_attention(q, k, v, clusters=clusters, topk=topk, key_padding_mask=kpm,
                                                 generator=gen(5), return_clusters=True)
    assert out.shape == (N, H, 1, M)
    assert info.counts.shape == (N, H, 1)
    assert torch.equal(info.assignment, torch.zeros(N, H, 1, dtype=torch.int64))
    assert rel_err(out, ref_full(q, k, v, key_padding_mask=kpm)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# hardmax
# ---------------------------------------------------------------------------------------------


def random_spd(d, seed):
    b = torch.randn(d, d, generator=gen(seed), dtype=torch.float64)
    return b @ b.T + 0.5 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("use_A", [False, True])
def test_hardmax_exact_matches_reference(use_A):
    q, k, v = make_qkv(N, H, 13, 11, 4, 3, seed=9, dtype=torch.float64)
    A = random_spd(4, 1) if use_A else None
    kpm = padding_mask([11, 6], 11, left=[False, True])
    qpm = padding_mask([13, 10], 13)
    got = hardmax_attention(q, k, v, qk_matrix=A, key_padding_mask=kpm, query_padding_mask=qpm)
    ref = ref_hardmax(q, k, v, A=A, key_padding_mask=kpm, query_padding_mask=qpm)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # in general position every attention set is a single real key: the output rows are value rows
    sets = ref_hardmax_sets(q, k, A, key_padding_mask=kpm)
    assert bool((sets.sum(-1) == 1).all())


def test_hardmax_ties_average_the_whole_set():
    q, k, v = make_qkv(1, 1, 6, 5, 3, 2, seed=10, dtype=torch.float64)
    k[0, 0, 3] = k[0, 0, 1]  # exact duplicate keys: tie in every row that picks one of them
    k[0, 0, 4] = k[0, 0, 1]
    got = hardmax_attention(q, k, v)
    ref = ref_hardmax(q, k, v)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    sets = ref_hardmax_sets(q, k)
    assert bool((sets.sum(-1) == 3).any()), "test data should contain a three-way tie"
    # tie_tolerance widens the set
    tol = 0.5
    torch.testing.assert_close(hardmax_attention(q, k, v, tie_tolerance=tol), ref_hardmax(q, k, v, tie_tolerance=tol),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ref_hardmax(q, k, v, tie_tolerance=tol), ref)


def self_points(n, t, d, seed):
    z = torch.randn(n, 1, t, d, generator=gen(seed), dtype=torch.float64)
    return z


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("use_A", [False, True])
def test_hardmax_strict_leaders_are_fixed_points_and_info(alpha, use_A):
    z = self_points(4, 20, 3, seed=11)
    A = random_spd(3, 2) if use_A else None
    out, info = hardmax_attention(z, z, z, alpha=alpha, qk_matrix=A, return_leaders=True)
    assert isinstance(info, HardmaxInfo)
    lead = strict_leaders(z, A)
    assert bool(lead.any()) and bool((~lead).any())
    assert torch.equal(info.leaders, lead)
    sets = ref_hardmax_sets(z, z, A)
    assert torch.equal(info.set_size, sets.sum(-1))
    torch.testing.assert_close(out[lead], z[lead], rtol=0, atol=1e-14)
    # followers move
    assert bool(((out - z).norm(dim=-1)[~lead] > 1e-6).all())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("use_A", [False, True])
def test_hardmax_layer_is_convex_combination(alpha, use_A):
    d, t = 3, 20
    z = self_points(3, t, d, seed=12)
    A = random_spd(d, 3) if use_A else None
    out = hardmax_attention(z, z, z, alpha=alpha, qk_matrix=A)
    sets = ref_hardmax_sets(z, z, A).double()  # (n, 1, t, t)
    coeff = (torch.eye(t, dtype=torch.float64) + alpha * sets / sets.sum(-1, keepdim=True)) / (1 + alpha)
    assert bool((coeff >= 0).all())
    torch.testing.assert_close(coeff.sum(-1), torch.ones(3, 1, t, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(out, coeff @ z, rtol=1e-12, atol=1e-12)
    # each output lies in the convex hull of the inputs: in particular inside their bounding box
    assert bool((out <= z.amax(2, keepdim=True) + 1e-12).all() and (out >= z.amin(2, keepdim=True) - 1e-12).all())


def run_layers(z, A, alpha, layers):
    traj = [z]
    for _ in range(layers):
        z = hardmax_attention(z, z, z, alpha=alpha, qk_matrix=A)
        traj.append(z)
    return torch.stack(traj)  # (layers + 1, n, 1, t, d)


# Point sets (seed, dim, A kind) for which the float64 simulation (hardmax_layer_ref) converges onto
# the INITIAL strict leaders. Not every configuration does: see test_hardmax_new_leaders_can_emerge.
CONVERGE_CASES = [(0, 2, "I"), (1, 2, "I"), (2, 3, "I"), (3, 2, "spd"), (4, 3, "spd")]


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("seed,d,kind", CONVERGE_CASES)
def test_hardmax_200_layers_converge_to_initial_leaders(seed, d, kind, alpha):
    t = 20
    z0 = self_points(1, t, d, seed=100 + seed)
    A = random_spd(d, 200 + seed) if kind == "spd" else None
    traj = run_layers(z0, A, alpha, 200)
    final = traj[-1]
    lead = strict_leaders(z0, A)  # (1, 1, t)
    leader_pts = z0[lead]  # (n_leaders, d)
    assert 1 <= leader_pts.shape[0] < t

    # independent float64 simulation: precondition of this case, and agreement step by step
    zr = z0
    for layer in range(1, 201):
        zr = hardmax_layer_ref(zr, A, alpha)
        if layer in (1, 2, 5, 20):
            torch.testing.assert_close(traj[layer], zr, rtol=1e-9, atol=1e-9)
    assert float(torch.cdist(zr[0, 0], leader_pts).min(-1).values.max()) < 1e-9, "test-case precondition"

    dist = torch.cdist(final[0, 0], leader_pts).min(-1).values
    assert float(dist.max()) < 1e-6, f"tokens not at an initial leader: {dist.max()}"
    # the leaders never move
    torch.testing.assert_close(traj[:, lead], z0[lead].expand(201, -1, -1), rtol=0, atol=1e-12)

    # tail: the distance of not-yet-converged tokens to their limit shrinks by 1/(1+alpha) per layer
    dist_t = (traj - final).norm(dim=-1)[:, 0, 0]  # (201, t)
    ratios = []
    for layer in range(5, 200):
        for i in range(t):
            if 1e-10 < dist_t[layer, i] < 1e-2:
                ratios.append(float(dist_t[layer + 1, i] / dist_t[layer, i]))
    assert len(ratios) >= 10
    ratios = torch.tensor(ratios)
    expected = 1 / (1 + alpha)
    assert float((ratios / expected - 1).abs().max()) < 0.05, (ratios.min(), ratios.max(), expected)


def test_hardmax_new_leaders_can_emerge():
    """Counter-example to 'every token converges to an initial leader': 20 points in R^2, A = I.

    Token 8 is not an initial leader, but after one layer it is a strict leader, and tokens converge
    to it. The implementation must follow the dynamics (checked against the float64
    reference), and every limit point is a strict leader of the limit configuration."""
    g = gen(13)
    z0 = torch.randn(20, 2, generator=g, dtype=torch.float64).view(1, 1, 20, 2)
    traj = run_layers(z0, None, 1.0, 200)
    zr = z0
    for layer in range(1, 201):
        zr = hardmax_layer_ref(zr, None, 1.0)
        if layer in (1, 2, 5, 20, 200):
            torch.testing.assert_close(traj[layer], zr, rtol=1e-9, atol=1e-9)
    init_lead = strict_leaders(z0)
    new = strict_leaders(traj[1]) & ~init_lead
    assert new[0, 0].nonzero().flatten().tolist() == [8]
    final = traj[-1][0, 0]
    d_init = torch.cdist(final, z0[init_lead]).min(-1).values
    assert float(d_init.max()) > 1e-2
    # limit points: distinct positions of the final configuration, each a strict leader there
    limit_pts = torch.unique(final.round(decimals=6), dim=0)
    assert bool(strict_leaders(limit_pts.view(1, 1, -1, 2)).all())


def gap_separated_qkv(seed, min_gap=0.05):
    """float32 q, k, v whose best score beats the runner-up by >= min_gap in every row."""
    for attempt in range(1000):
        q, k, v = make_qkv(2, 2, 9, 11, 4, 3, seed=seed * 1000 + attempt)
        s = torch.einsum("nhle,nhse->nhls", q.double(), k.double())
        top2 = s.topk(2, dim=-1).values
        if float((top2[..., 0] - top2[..., 1]).min()) >= min_gap:
            return q, k, v
    raise AssertionError("could not draw gap-separated inputs")


def test_low_temperature_softmax_approaches_hardmax():
    q, k, v = gap_separated_qkv(1)
    exact = hardmax_attention(q, k, v)
    torch.testing.assert_close(exact.double(), ref_hardmax(q, k, v), rtol=1e-6, atol=1e-6)
    errs = []
    for temp in [1e-1, 1e-2, 1e-3, 1e-4]:
        soft = hardmax_attention(q, k, v, temperature=temp)
        assert soft.dtype == torch.float32 and bool(torch.isfinite(soft).all())
        errs.append(float((soft.double() - ref_hardmax(q, k, v)).abs().max()))
    assert errs[0] > 1e-3, errs  # at T = 0.1 the softmax is visibly soft
    for a, b in zip(errs, errs[1:]):
        assert b <= a + 1e-6, errs
    assert errs[-1] < 1e-5, errs
    # the temperature path is a real softmax at moderate T
    s = torch.einsum("nhle,nhse->nhls", q.double(), k.double())
    torch.testing.assert_close(hardmax_attention(q, k, v, temperature=0.7).double(),
                               torch.softmax(s / 0.7, -1) @ v.double(), rtol=1e-5, atol=1e-5)


def test_hardmax_temperature_with_qk_matrix_and_masks():
    q, k, v = make_qkv(N, 2, 7, 9, 4, 3, seed=14, dtype=torch.float64)
    A = random_spd(4, 5)
    kpm = padding_mask([9, 4], 9, left=[False, True])
    qpm = padding_mask([5, 7], 7)
    got = hardmax_attention(q, k, v, qk_matrix=A, temperature=0.3, key_padding_mask=kpm, query_padding_mask=qpm)
    s = torch.einsum("nhle,ef,nhsf->nhls", q, A, k)  # q_iᵀ A k_j
    s = s.masked_fill(kpm[:, None, None, :], -math.inf)
    ref = (torch.softmax(s / 0.3, -1) @ v) * (~qpm)[:, None, :, None]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# half precision on CPU
# ---------------------------------------------------------------------------------------------

TOL = {torch.bfloat16: 4e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["full", "clustered", "iclustered", "hardmax", "hardmax_T"])
def test_half_precision_forward_close_to_fp32(op, dtype):
    qd, _ = repeated_queries(N, H, L, E, 5, seed=30)  # few distinct queries: clustered == full
    _, k, v = make_qkv(N, H, L, S, E, M, seed=31)
    q = qd.float() * 0.5
    kpm = padding_mask([S, 30], S)
    qpm = padding_mask([L - 2, L], L)
    # round the inputs to the half dtype first, so that only the computation differs
    q, k, v = (t.to(dtype) for t in (q, k, v))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    kw = dict(key_padding_mask=kpm, query_padding_mask=qpm)
    if op == "full":
        got = full_attention(q, k, v, **kw)
        ref = ref_full(q32, k32, v32, **kw)
    elif op == "clustered":
        got = clustered_attention(q, k, v, clusters=8, iterations=12, generator=gen(0), **kw)
        ref = ref_full(q32, k32, v32, **kw)
    elif op == "iclustered":
        got = improved_clustered_attention(q, k, v, clusters=8, topk=S, generator=gen(0), **kw)
        ref = ref_full(q32, k32, v32, **kw)
    elif op == "hardmax":
        got = hardmax_attention(q, k, v, **kw)
        ref = ref_hardmax(q32, k32, v32, **kw)
    else:  # the paper's training temperature: 1/T overflows fp16 unless scores are computed in fp32
        got = hardmax_attention(q, k, v, temperature=1e-3, **kw)
        ref = hardmax_attention(q32, k32, v32, temperature=1e-3, **kw)
    assert got.dtype == dtype and got.shape == (N, H, L, M)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), ref.double(), rtol=TOL[dtype], atol=TOL[dtype])


def test_fp16_low_temperature_does_not_overflow():
    """Scores of about ±100 at T = 1e-3 are ±1e5 after scaling: beyond fp16's 65504. The softmax must be
    computed in fp32 (DESIGN.md §2) and then agree with the exact hardmax on gap-separated inputs."""
    q, k, v = gap_separated_qkv(2, min_gap=0.2)
    scale = 100.0 / float(torch.einsum("nhle,nhse->nhls", q, k).abs().max())
    q = q * scale  # |scores| <= 100, gaps >= 0.2 * scale
    q16, k16, v16 = (t.half() for t in (q, k, v))
    got = hardmax_attention(q16, k16, v16, temperature=1e-3)
    assert got.dtype == torch.float16
    assert bool(torch.isfinite(got).all())
    ref = ref_hardmax(q16.float(), k16.float(), v16.float())
    torch.testing.assert_close(got.double(), ref, rtol=5e-3, atol=5e-3)
