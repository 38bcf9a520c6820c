"""Input validation shared by the attention ops.

Every check raises ``ValueError`` (shapes, values, devices) or ``TypeError`` (types, dtypes)
with a message that names the offending argument and says what was expected.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .options import MAX_HASH_BITS, check

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
__all__ = ["MAX_HASH_BITS"]  # re-exported for the kernels' callers


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            expected = "(N, H, L, E)" if name == "q" else ("(N, H, S, E)" if name == "k" else "(N, H, S, M)")
            raise ValueError(f"{name} must have 4 dimensions {expected}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            "q, k and v must agree on (N, H): got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the feature size E={q.shape[3]} of q, got k {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many positions S={k.shape[2]} as k, got v {tuple(v.shape)}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need at least one position, got L={q.shape[2]}, S={k.shape[2]}")


def check_mask(mask: Optional[Tensor], name: str, n: int, length: int, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = padded), got {mask.dtype}")
    if tuple(mask.shape) != (n, length):
        raise ValueError(f"{name} must have shape {(n, length)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")


def check_masks(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor]) -> None:
    n = q.shape[0]
    check_mask(key_padding_mask, "key_padding_mask", n, k.shape[2], q.device)
    check_mask(query_padding_mask, "query_padding_mask", n, q.shape[2], q.device)
    # On CUDA the all-padded check would synchronise with the host on every call; it is left to
    # the caller there (fairseq never pads a whole row), and such a row yields NaN.
    if key_padding_mask is not None and key_padding_mask.device.type == "cpu":
        full = key_padding_mask.all(dim=1)
        if bool(full.any()):
            rows = full.nonzero().flatten().tolist()
            raise ValueError(
                f"key_padding_mask pads every key of batch row(s) {rows}: a query there has nothing to attend to; "
                "drop empty sequences before attention"
            )


def check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on the device of q ({device}), got {generator.device}")


def check_clustering(clusters, hash_bits, iterations, hash_bias=True) -> None:
    """The clustering options against their bounds in :data:`.options.OPTIONS`."""
    for name, value in (("clusters", clusters), ("hash_bits", hash_bits), ("iterations", iterations),
                        ("hash_bias", hash_bias)):  # fmt: skip
        check(name, value)
