"""The compiled operators of csrc/ (``fairseq_plugin._C``): loading, fake kernels and autograd.

The extension registers its operators under ``torch.ops.fairseq_clustered`` (schemas in
csrc/ops.cpp, C++ CPU kernels in csrc/cpu/). This module loads it on first use, registers a fake
kernel for every operator (so ``torch.compile`` can trace them) and the autograd formulas of the
differentiable ones, and tells the attention functions whether a tensor can take the compiled
path: CPU float32 and float64 (float16 / bfloat16 inputs run the reference: it does not pay
there). CUDA tensors take the Triton kernels instead (:mod:`.backend`, :mod:`.triton`).

If the extension is missing or fails to load, every op runs its PyTorch reference and a warning
says so once, with the load error and how to rebuild. ``FAIRSEQ_PLUGIN_COMPILED=0`` or
:func:`use_compiled` (``with use_compiled(False): ...``) selects the reference deliberately, for
the Triton kernels too (the tests and the benchmark compare the two this way).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

OPS = "fairseq_clustered"
REBUILD = "rebuild with: pip install --no-build-isolation -e . (from the repository root; or bash scripts/setup.sh)"

_loaded: Optional[bool] = None
_load_error: Optional[str] = None
_enabled = os.environ.get("FAIRSEQ_PLUGIN_COMPILED", "1") != "0"
_warned: set = set()
_CPU_DTYPES = (torch.float32, torch.float64)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load() -> bool:
    """Load the extension once; True when its operators are registered.

    Only a failed import of the extension means "unavailable" (the ops then run their reference
    and say why once). An error while registering the fake kernels or the autograd formulas is a
    bug of this package, and is raised."""
    global _loaded, _load_error
    if _loaded is None:
        try:
            importlib.import_module("fairseq_plugin._C")
        except (ImportError, OSError) as err:  # not built, undefined symbol, wrong torch ABI, ...
            _loaded, _load_error = False, f"{type(err).__name__}: {err}"
            return _loaded
        _register_python_parts()
        _loaded = True
    return _loaded


def load_error() -> Optional[str]:
    """Why the extension did not load (None when it did, or before the first attempt)."""
    load()
    return _load_error


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def use_compiled(flag: bool) -> Iterator[None]:
    """Within the block, take (True) or skip (False) the compiled path."""
    global _enabled
    before, _enabled = _enabled, bool(flag)
    try:
        yield
    finally:
        _enabled = before


def usable(t: Tensor) -> bool:
    """Whether a call on tensors like ``t`` (device, dtype) takes the compiled CPU path."""
    if not _enabled or t.device.type != "cpu":
        return False
    if not load():
        _warn_once(
            "load",
            f"fairseq_plugin: the compiled clustered-attention ops are unavailable ({_load_error}); "
            f"every op runs its PyTorch reference, which is correct but slower; {REBUILD}",
        )
        return False
    return t.dtype in _CPU_DTYPES or not t.is_floating_point()


def _weights_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _register_python_parts() -> None:
    """Fake kernels and autograd for the operators the extension just registered."""
    ops = getattr(torch.ops, OPS)
    lib = f"{OPS}::"

    @torch.library.register_fake(lib + "lsh_hash")
    def _(x, planes):
        return x.new_empty(x.shape[:-1], dtype=torch.int64)

    @torch.library.register_fake(lib + "hamming_kmeans")
    def _(codes, init, reseed, padding_mask, hash_bits):
        return codes.new_empty(codes.shape), codes.new_empty(init.shape)

    @torch.library.register_fake(lib + "cluster_sum")
    def _(x, assignment, clusters):
        n, h, _, d = x.shape
        return x.new_empty(n, h, clusters, d)

    @torch.library.register_fake(lib + "cluster_broadcast")
    def _(y, assignment):
        n, h, _, d = y.shape
        return y.new_empty(n, h, assignment.shape[2], d)

    @torch.library.register_fake(lib + "cluster_combine")
    def _(top, mass, rest, assignment):
        return torch.empty_like(top)

    @torch.library.register_fake(lib + "cluster_combine_backward")
    def _(grad, top, mass, assignment):
        n, h, c = mass.shape
        return torch.empty_like(top), torch.empty_like(mass), top.new_empty(n, h, c, top.shape[3])

    @torch.library.register_fake(lib + "softmax_topk")
    def _(scores, key_padding_mask, topk):
        n, h, c, s = scores.shape
        attn = scores.new_empty(scores.shape, dtype=_weights_dtype(scores.dtype))
        return attn, scores.new_empty(n, h, c, min(topk, s), dtype=torch.int64)

    @torch.library.register_fake(lib + "centroid_attention")
    def _(centroids, k, v, key_padding_mask, topk, scale):
        n, h, c, _ = centroids.shape
        kk = min(topk, k.shape[2])
        return (centroids.new_empty(n, h, c, k.shape[2]), centroids.new_empty(n, h, c, kk, dtype=torch.int64),
                centroids.new_empty(n, h, c), centroids.new_empty(n, h, c, v.shape[3]))  # fmt: skip

    @torch.library.register_fake(lib + "centroid_attention_backward")
    def _(grad_mass, grad_rest, attn, top, centroids, k, v, scale):
        return torch.empty_like(centroids), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake(lib + "topk_attention")
    def _(q, k, v, assignment, top, key_padding_mask, scale):
        n, h, length, _ = q.shape
        out = q.new_empty(n, h, length, v.shape[3])
        return out, q.new_empty(n, h, length, top.shape[3], dtype=_weights_dtype(q.dtype))

    @torch.library.register_fake(lib + "centroid_topk")
    def _(centroids, k, v, key_padding_mask, topk, scale):
        n, h, c, _ = centroids.shape
        kk = min(topk, k.shape[2])
        return (centroids.new_empty(n, h, c, kk, dtype=torch.int64), centroids.new_empty(n, h, c),
                centroids.new_empty(n, h, c, v.shape[3]))  # fmt: skip

    @torch.library.register_fake(lib + "topk_attention_combine")
    def _(q, k, v, assignment, top, mass, rest, key_padding_mask, scale):
        n, h, length, _ = q.shape
        return q.new_empty(n, h, length, v.shape[3])

    @torch.library.register_fake(lib + "topk_attention_backward")
    def _(grad_out, q, k, v, assignment, top, weights, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    # cluster_sum and cluster_broadcast are linear and each other's adjoint.
    def setup_assignment(ctx, inputs, output):
        ctx.assignment = inputs[1]
        ctx.clusters = inputs[0].shape[2]

    def sum_backward(ctx, grad):
        return ops.cluster_broadcast(grad.contiguous(), ctx.assignment), None, None

    def broadcast_backward(ctx, grad):
        return ops.cluster_sum(grad.contiguous(), ctx.assignment, ctx.clusters), None

    torch.library.register_autograd(lib + "cluster_sum", sum_backward, setup_context=setup_assignment)
    torch.library.register_autograd(lib + "cluster_broadcast", broadcast_backward, setup_context=setup_assignment)

    def setup_combine(ctx, inputs, output):
        top, mass, _, assignment = inputs
        ctx.save_for_backward(top, mass, assignment)

    def combine_backward(ctx, grad):
        top, mass, assignment = ctx.saved_tensors
        grad_top, grad_mass, grad_rest = ops.cluster_combine_backward(grad.contiguous(), top, mass, assignment)
        return grad_top, grad_mass, grad_rest, None

    torch.library.register_autograd(lib + "cluster_combine", combine_backward, setup_context=setup_combine)

    def setup_softmax(ctx, inputs, output):
        attn, top = output
        ctx.save_for_backward(attn)
        ctx.scores_dtype = inputs[0].dtype
        ctx.mark_non_differentiable(top)

    def softmax_backward(ctx, grad_attn, grad_top):
        (attn,) = ctx.saved_tensors
        grad = grad_attn.to(attn.dtype)
        return (attn * (grad - (grad * attn).sum(-1, keepdim=True))).to(ctx.scores_dtype), None, None

    torch.library.register_autograd(lib + "softmax_topk", softmax_backward, setup_context=setup_softmax)

    def setup_centroid(ctx, inputs, output):
        centroids, k, v, _, _, scale = inputs
        attn, top, _, _ = output
        ctx.save_for_backward(attn, top, centroids, k, v)
        ctx.scale = scale
        ctx.mark_non_differentiable(attn, top)  # attn is kept for the backward only
        ctx.set_materialize_grads(False)  # no (N, H, C, S) zeros for attn's gradient

    def centroid_backward(ctx, grad_attn, grad_top, grad_mass, grad_rest):
        attn, top, centroids, k, v = ctx.saved_tensors
        n, h, c, _ = attn.shape
        grad_mass = attn.new_zeros(n, h, c) if grad_mass is None else grad_mass
        grad_rest = attn.new_zeros(n, h, c, v.shape[3]) if grad_rest is None else grad_rest
        grads = ops.centroid_attention_backward(grad_mass, grad_rest, attn, top, centroids, k, v, ctx.scale)
        return *grads, None, None, None

    torch.library.register_autograd(lib + "centroid_attention", centroid_backward, setup_context=setup_centroid)

    def setup_topk(ctx, inputs, output):
        q, k, v, assignment, top, _, scale = inputs
        _, weights = output
        ctx.save_for_backward(q, k, v, assignment, top, weights)
        ctx.scale = scale
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # no (N, H, L, k) zeros for the weights' gradient

    def topk_backward(ctx, grad_out, grad_weights):
        q, k, v, assignment, top, weights = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None, None
        gq, gk, gv = ops.topk_attention_backward(grad_out.contiguous(), q, k, v, assignment, top, weights, ctx.scale)
        return gq, gk, gv, None, None, None, None

    torch.library.register_autograd(lib + "topk_attention", topk_backward, setup_context=setup_topk)
