"""Backward passes: torch.autograd.gradcheck in float64, and an independent gradient oracle for
improved-clustered attention (whose reference library drops the gradient through m̂)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from fairseq_plugin.ops import (
    clustered_attention,
    full_attention,
    hardmax_attention,
    improved_clustered_attention,
)

from . import gen, make_qkv, padding_mask, ref_clustered_from_assignment

# small sizes: L=9 queries, S=7 keys, E=4, M=3; two batch rows with different key padding.
# One head and few k-means iterations keep the ~2 x numel forward passes of gradcheck cheap.
N, H, L, S, E, M = 2, 1, 9, 7, 4, 3
ITERS = 3
KPM = padding_mask([S, 5], S, left=[False, True])
QPM = padding_mask([L, 7], L)


def inputs(seed):
    return make_qkv(N, H, L, S, E, M, seed=seed, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_full_attention(masked):
    q, k, v = inputs(0)
    kw = dict(key_padding_mask=KPM, query_padding_mask=QPM) if masked else {}
    assert gradcheck(lambda q, k, v: full_attention(q, k, v, **kw), (q, k, v))


def clustered_fn(op, seed, **kw):
    fn = clustered_attention if op == "clustered" else improved_clustered_attention

    def f(q, k, v):
        # a fresh generator with the same seed: every evaluation draws the same hash planes and
        # k-means initialisation, so the (piecewise constant) assignment is fixed during gradcheck
        return fn(q, k, v, clusters=3, iterations=ITERS, generator=gen(seed), key_padding_mask=KPM, **kw)

    return f


@pytest.mark.parametrize(
    "op,kw,fast",
    [
        ("clustered", {}, False),
        ("clustered", {"query_padding_mask": QPM, "softmax_temp": 0.8}, True),
        ("iclustered", {"topk": 3}, False),  # topk < S: the gradient goes through m̂
        ("iclustered", {"topk": 3, "query_padding_mask": QPM}, True),
        ("iclustered", {"topk": 6}, True),  # topk > real keys of row 1 (5), < S
        ("iclustered", {"topk": S}, True),
        ("iclustered", {"topk": 32}, True),
    ],
)
def test_gradcheck_clustered(op, kw, fast):
    q, k, v = inputs(1)
    f = clustered_fn(op, 11, **kw)
    # sanity: the function is deterministic, and it uses more than one cluster
    out1, info = (clustered_attention if op == "clustered" else improved_clustered_attention)(
        q, k, v, clusters=3, iterations=ITERS, generator=gen(11), key_padding_mask=KPM, return_clusters=True, **kw)
    assert torch.equal(out1, f(q, k, v))
    assert int((info.counts > 0).sum(-1).min()) >= 2
    # fast_mode compares random projections of the Jacobians (cheaper; still fails on a wrong gradient)
    assert gradcheck(f, (q, k, v), fast_mode=fast)


@pytest.mark.parametrize("topk", [2, 3])
@pytest.mark.parametrize("seed", [2, 3])
def test_iclustered_gradient_matches_independent_reference(topk, seed):
    """Gradient of the implementation == autograd through the float64 reference for its assignment,
    w.r.t. q, k and v; and it differs from the gradient with m̂ held constant (the reference
    library's defect), so the comparison can tell the two apart."""
    q, k, v = inputs(seed)
    out, info = improved_clustered_attention(
        q, k, v, clusters=3, topk=topk, key_padding_mask=KPM, query_padding_mask=QPM,
        generator=gen(seed), return_clusters=True,
    )
    w = torch.randn(out.shape, generator=gen(100 + seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))

    ref, _ = ref_clustered_from_assignment(q, k, v, info.assignment, 3, topk=topk,
                                           key_padding_mask=KPM, query_padding_mask=QPM)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=lambda m: f"d/d{name}: {m}")

    bad, _ = ref_clustered_from_assignment(q, k, v, info.assignment, 3, topk=topk, key_padding_mask=KPM,
                                           query_padding_mask=QPM, detach_mhat=True)
    bad_grads = torch.autograd.grad((bad * w).sum(), (q, k))
    assert max(float((g - b).abs().max()) for g, b in zip(grads[:2], bad_grads)) > 1e-4


@pytest.mark.parametrize("seed", [4, 5])
def test_iclustered_kv_gradient_finite_differences(seed):
    """topk < S under key padding: d/dk and d/dv agree with central finite differences, element by
    element (gradcheck on k, v with q held fixed) and along a random direction."""
    q, k, v = inputs(seed)
    q = q.detach()

    def f(k, v):
        return improved_clustered_attention(q, k, v, clusters=3, topk=3, iterations=ITERS,
                                            key_padding_mask=KPM, generator=gen(seed))

    if seed == 4:  # element by element once (the costly part), the directional check for every seed
        assert gradcheck(f, (k, v))

    w = torch.randn(N, H, L, M, generator=gen(200 + seed), dtype=torch.float64)
    dk = torch.randn(k.shape, generator=gen(300 + seed), dtype=torch.float64)
    dv = torch.randn(v.shape, generator=gen(400 + seed), dtype=torch.float64)
    gk, gv = torch.autograd.grad((f(k, v) * w).sum(), (k, v))
    analytic = float((gk * dk).sum() + (gv * dv).sum())
    h = 1e-6
    with torch.no_grad():
        plus = float((f(k + h * dk, v + h * dv) * w).sum())
        minus = float((f(k - h * dk, v - h * dv) * w).sum())
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # padded keys receive no gradient
    assert torch.equal(gk[1, :, :2], torch.zeros_like(gk[1, :, :2]))
    assert torch.equal(gv[1, :, :2], torch.zeros_like(gv[1, :, :2]))


@pytest.mark.parametrize("temperature", [0.5, 0.05])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_hardmax_temperature(temperature, masked):
    q, k, v = make_qkv(N, H, 6, 5, 3, 2, seed=6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, generator=gen(7), dtype=torch.float64)
    A = (b @ b.T + torch.eye(3, dtype=torch.float64)).requires_grad_(True)
    kw = dict(key_padding_mask=padding_mask([5, 3], 5), query_padding_mask=padding_mask([6, 4], 6)) if masked else {}

    def f(q, k, v, A):
        return hardmax_attention(q, k, v, qk_matrix=A, temperature=temperature, **kw)

    assert gradcheck(f, (q, k, v, A))


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_gradcheck_exact_hardmax_wrt_v(alpha):
    z = torch.randn(N, H, 6, 3, generator=gen(8), dtype=torch.float64)
    v = torch.randn(N, H, 6, 2, generator=gen(9), dtype=torch.float64, requires_grad=True)
    kpm = padding_mask([6, 4], 6)

    def f(v):
        return hardmax_attention(z, z, v, alpha=alpha, key_padding_mask=kpm)

    assert gradcheck(f, (v,))
