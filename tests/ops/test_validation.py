"""Input validation: the documented exception type, and a message that names the argument."""

from __future__ import annotations

import re

import pytest
import torch

from fairseq_plugin.ops import (
    clustered_attention,
    draw_planes,
    full_attention,
    hamming_kmeans,
    hardmax_attention,
    improved_clustered_attention,
)

from . import gen, make_qkv, padding_mask

N, H, L, S, E, M = 2, 2, 5, 6, 4, 3
OPS = ["full", "clustered", "iclustered", "hardmax"]


def call(op, q, k, v, **kw):
    if op == "full":
        return full_attention(q, k, v, **kw)
    if op == "clustered":
        return clustered_attention(q, k, v, **{"clusters": 2, "generator": gen(0), **kw})
    if op == "iclustered":
        return improved_clustered_attention(q, k, v, **{"clusters": 2, "topk": 3, "generator": gen(0), **kw})
    return hardmax_attention(q, k, v, **kw)


def qkv(dtype=torch.float32):
    return make_qkv(N, H, L, S, E, M, seed=0, dtype=dtype)


def names(arg):
    """A regex that matches `arg` as a whole word (so 'k' does not match inside 'key_padding_mask')."""
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])")


def assert_raises(exc, arg, fn, *args, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    assert names(arg).search(str(info.value)), f"message does not name {arg!r}: {info.value}"


def test_valid_inputs_run():
    q, k, v = qkv()
    for op in OPS:
        assert call(op, q, k, v).shape == (N, H, L, M)


# --- q, k, v ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("rank", [3, 5])
def test_wrong_rank(op, which, rank):
    t = dict(zip("qkv", qkv()))
    x = t[which]
    t[which] = x[0] if rank == 3 else x.unsqueeze(0)
    assert_raises(ValueError, which, call, op, t["q"], t["k"], t["v"])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dim", [0, 1, 3])  # batch, heads, feature size E
def test_k_mismatches_q(op, dim):
    q, k, v = qkv()
    shape = list(k.shape)
    shape[dim] += 1
    k = torch.randn(shape)
    if dim != 3:  # keep v consistent with k, so only the q/k mismatch is wrong
        vshape = list(v.shape)
        vshape[dim] += 1
        v = torch.randn(vshape)
    assert_raises(ValueError, "k", call, op, q, k, v)


@pytest.mark.parametrize("op", OPS)
def test_v_length_mismatches_k(op):
    q, k, v = qkv()
    v = torch.randn(N, H, S + 1, M)
    assert_raises(ValueError, "v", call, op, q, k, v)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_dtype(op, which, dtype):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which].to(dtype)
    assert_raises(TypeError, which, call, op, t["q"], t["k"], t["v"])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", ["k", "v"])
def test_mismatched_dtypes(op, which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which].double()
    assert_raises(TypeError, which, call, op, t["q"], t["k"], t["v"])


@pytest.mark.parametrize("op", OPS)
def test_non_tensor(op):
    q, k, v = qkv()
    assert_raises(TypeError, "q", call, op, q.tolist(), k, v)


@pytest.mark.parametrize("op", OPS)
def test_mismatched_devices(op):
    q, k, v = qkv()
    k_meta = k.to("meta")
    with pytest.raises(ValueError, match="device"):
        call(op, q, k_meta, v)
    with pytest.raises(ValueError, match="key_padding_mask"):
        call(op, q, k, v, key_padding_mask=torch.zeros(N, S, dtype=torch.bool, device="meta"))


# --- clustering hyper-parameters ------------------------------------------------------------------


@pytest.mark.parametrize("op", ["clustered", "iclustered"])
@pytest.mark.parametrize(
    "arg,value",
    [("clusters", 0), ("clusters", -1), ("hash_bits", 0), ("hash_bits", 64), ("hash_bits", -3),
     ("iterations", -1), ("softmax_temp", 0.0), ("softmax_temp", -1.0)],
)
def test_bad_clustering_arguments(op, arg, value):
    q, k, v = qkv()
    assert_raises(ValueError, arg, call, op, q, k, v, **{arg: value})


@pytest.mark.parametrize("value", [0, -2])
def test_bad_topk(value):
    q, k, v = qkv()
    assert_raises(ValueError, "topk", call, "iclustered", q, k, v, topk=value)


@pytest.mark.parametrize("value", [0.0, -0.5])
def test_bad_softmax_temp_full(value):
    q, k, v = qkv()
    assert_raises(ValueError, "softmax_temp", full_attention, q, k, v, softmax_temp=value)


def test_iterations_zero_and_hash_bits_bounds_are_valid():
    q, k, v = qkv()
    for kw in ({"iterations": 0}, {"hash_bits": 1}, {"hash_bits": 63}):
        assert call("clustered", q, k, v, **kw).shape == (N, H, L, M)
        assert call("iclustered", q, k, v, **kw).shape == (N, H, L, M)


def test_lower_level_validation():
    assert_raises(ValueError, "hash_bits", draw_planes, 0, E, True, gen(0), "cpu")
    assert_raises(ValueError, "hash_bits", draw_planes, 64, E, True, gen(0), "cpu")
    codes = torch.zeros(N, H, L, dtype=torch.int64)
    assert_raises(ValueError, "clusters", hamming_kmeans, codes, hash_bits=8, clusters=0, iterations=2,
                  padding_mask=None, generator=gen(0))
    assert_raises(ValueError, "iterations", hamming_kmeans, codes, hash_bits=8, clusters=2, iterations=-1,
                  padding_mask=None, generator=gen(0))


# --- masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(N, S + 1), (N + 1, S), (S,), (N, 1, S)])
def test_key_padding_mask_shape(op, shape):
    q, k, v = qkv()
    assert_raises(ValueError, "key_padding_mask", call, op, q, k, v,
                  key_padding_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(N, L + 1), (L,)])
def test_query_padding_mask_shape(op, shape):
    q, k, v = qkv()
    assert_raises(ValueError, "query_padding_mask", call, op, q, k, v,
                  query_padding_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", ["key_padding_mask", "query_padding_mask"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_non_bool_mask(op, which, dtype):
    q, k, v = qkv()
    length = S if which == "key_padding_mask" else L
    assert_raises(TypeError, which, call, op, q, k, v, **{which: torch.zeros(N, length, dtype=dtype)})


@pytest.mark.parametrize("op", OPS)
def test_fully_padded_key_row(op):
    q, k, v = qkv()
    kpm = padding_mask([S, 0], S)
    assert_raises(ValueError, "key_padding_mask", call, op, q, k, v, key_padding_mask=kpm)
    # a single real key is fine
    assert call(op, q, k, v, key_padding_mask=padding_mask([S, 1], S)).shape == (N, H, L, M)


# --- hardmax ------------------------------------------------------------------------------------------


def self_z():
    return torch.randn(N, H, L, E, generator=gen(1))


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_hardmax_bad_alpha(value):
    z = self_z()
    assert_raises(ValueError, "alpha", hardmax_attention, z, z, z, alpha=value)


@pytest.mark.parametrize("value", [0.0, -1e-3])
def test_hardmax_bad_temperature(value):
    z = self_z()
    assert_raises(ValueError, "temperature", hardmax_attention, z, z, z, temperature=value)


@pytest.mark.parametrize("shape", [(E, E + 1), (E + 1, E + 1), (E,), (1, E, E)])
def test_hardmax_qk_matrix_shape(shape):
    z = self_z()
    assert_raises(ValueError, "qk_matrix", hardmax_attention, z, z, z, qk_matrix=torch.ones(shape))


def test_hardmax_alpha_needs_self_attention():
    q, k, v = qkv()  # L = 5 != S = 6
    with pytest.raises(ValueError, match="alpha"):
        hardmax_attention(q, k, v, alpha=1.0)
