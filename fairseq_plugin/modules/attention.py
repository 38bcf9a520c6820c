"""Multi-head self-attention whose core is softmax, clustered, i-clustered or hardmax attention.

:class:`EfficientSelfAttention` is a :class:`fairseq.modules.MultiheadAttention`: it keeps the
parameters ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` under the same names, so a
checkpoint trained with one attention type loads into a model with another (this is how a
pretrained model is approximated with clustered attention without retraining). Only the core
differs: ``forward`` projects, reshapes to (N, H, L, E) and calls :mod:`fairseq_plugin.ops`.

Attention-weight dropout is not applied, for any attention type: the clustered and hardmax
kernels have none, and the softmax baseline must match them to be a fair comparison (and to
make i-clustered with ``topk >= length`` its exact oracle). A requested ``attention_dropout > 0``
is ignored with a one-time warning; the layer's residual dropout (``--dropout``) still applies.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import MultiheadAttention
from torch import Tensor

from .. import ops
from ..config import AttentionConfig
from .statistics import record

logger = logging.getLogger(__name__)

_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


class EfficientSelfAttention(MultiheadAttention):
    """fairseq multi-head attention (T×B×C in and out) with a pluggable attention core."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention_cfg: AttentionConfig,
        *,
        dropout: float = 0.0,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ):
        # dropout=0.0: attention-weight dropout is never applied (module docstring); this also
        # keeps fairseq's own softmax path, used for an explicit attn_mask, dropout-free.
        super().__init__(
            embed_dim,
            num_heads,
            dropout=0.0,
            self_attention=True,
            q_noise=q_noise,
            qn_block_size=qn_block_size,
        )
        self.attention_cfg = attention_cfg
        if dropout > 0:
            _warn_once(
                "attention_dropout",
                f"attention_dropout={dropout} is ignored: fairseq_plugin attention applies no dropout "
                "to attention weights (for any --attention-type); use --dropout for residual dropout",
            )

    def extra_repr(self) -> str:
        cfg = self.attention_cfg
        extra = {
            "clustered": f", clusters={cfg.clusters}, hash_bits={cfg.hash_bits}",
            "i_clustered": f", clusters={cfg.clusters}, topk={cfg.topk}, hash_bits={cfg.hash_bits}",
            "hardmax": f", temperature={cfg.hardmax_temperature}",
        }.get(cfg.attention_type, "")
        return f"attention_type={cfg.attention_type}, heads={self.num_heads}{extra}"

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        **unused,
    ) -> Tuple[Tensor, None]:
        """query, key, value: (T, B, C); key_padding_mask: (B, S), True/1 = padded.
        Returns ((T, B, C), None): attention weights are never materialised."""
        cfg = self.attention_cfg
        if unused.get("incremental_state") is not None or unused.get("before_softmax"):
            raise ValueError("EfficientSelfAttention is encoder self-attention: incremental_state and before_softmax are not supported")
        key = query if key is None else key
        value = key if value is None else value
        if attn_mask is not None and cfg.attention_type != "softmax":
            raise ValueError(
                f"attn_mask is only supported with --attention-type softmax, not {cfg.attention_type}; "
                "express padding through key_padding_mask instead"
            )

        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(query).view(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)  # (N, H, L, E)
        k = self.k_proj(key).view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)  # (N, H, S, E)
        v = self.v_proj(value).view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)  # (N, H, S, E)
        kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool)  # (N, S)
        qpm = kpm if key is query else None  # self-attention: padded queries take no part  # (N, L)

        if attn_mask is None:
            out = self._attend(q, k, v, kpm, qpm)  # (N, H, L, E)
        else:
            out = self._attend_with_mask(q, k, v, attn_mask, kpm, qpm)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)  # (T, B, C)
        return self.out_proj(out), None

    def _attend_with_mask(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, kpm: Optional[Tensor], qpm: Optional[Tensor]
    ) -> Tensor:
        """Softmax attention with fairseq's attn_mask: additive float (T, S) or (N*H, T, S), or bool
        with True = masked; --softmax-temp applies here as on every other path."""
        n, h, length, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(q.dtype)
        bias = bias.view(n, h, length, s) if bias.dim() == 3 else bias.view(1, 1, length, s)  # (N|1, H|1, L, S)
        if kpm is not None:
            bias = bias.masked_fill(kpm[:, None, None, :], float("-inf"))
        scale = self.head_dim**-0.5 if self.attention_cfg.softmax_temp is None else self.attention_cfg.softmax_temp
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (N, H, L, E)
        return out if qpm is None else out.masked_fill(qpm[:, None, :, None], 0.0)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], qpm: Optional[Tensor]) -> Tensor:
        cfg = self.attention_cfg
        kind = cfg.attention_type
        stats = cfg.attention_stats
        masks = dict(key_padding_mask=kpm, query_padding_mask=qpm)
        if kind == "softmax":
            return ops.full_attention(q, k, v, softmax_temp=cfg.softmax_temp, **masks)
        if kind == "hardmax":
            stats = stats and q.shape[2] == k.shape[2]  # leaders need self-attention (L == S)
            result = ops.hardmax_attention(
                q,
                k,
                v,
                temperature=cfg.hardmax_temperature if self.training else None,  # exact in eval
                tie_tolerance=cfg.hardmax_tie_tolerance,
                return_leaders=stats,
                **masks,
            )
            if not stats:
                return result
            out, info = result
            _log_leaders(info, qpm)
            return out
        clustering = dict(
            clusters=cfg.clusters,
            hash_bits=cfg.hash_bits,
            iterations=cfg.cluster_iterations,
            hash_bias=cfg.hash_bias,
            softmax_temp=cfg.softmax_temp,
            return_clusters=stats,
            **masks,
        )
        if kind == "clustered":
            result = ops.clustered_attention(q, k, v, **clustering)
        else:
            if cfg.topk >= k.shape[2]:
                _warn_once(
                    "topk_exact",
                    f"topk={cfg.topk} >= sequence length {k.shape[2]}: i_clustered attention is exact "
                    "softmax attention here (no approximation, no speed-up); lower --topk to approximate",
                )
            result = ops.improved_clustered_attention(q, k, v, topk=cfg.topk, **clustering)
        if not stats:
            return result
        out, info = result
        _log_clusters(info)
        return out


@torch.no_grad()
def _log_clusters(info: "ops.ClusterInfo") -> None:
    """attn_cluster_size_cv: std / mean of the sizes of the non-empty clusters, per (batch, head),
    averaged; attn_topk_mass: m̂ averaged over queries (each query sees its cluster's m̂)."""
    counts = info.counts.to(torch.float32)  # (N, H, C)
    nonempty = counts > 0
    used = nonempty.sum(-1).clamp_min(1)  # (N, H)
    mean = counts.sum(-1) / used  # (N, H)
    var = ((counts - mean.unsqueeze(-1)).square() * nonempty).sum(-1) / used
    cv = (var.sqrt() / mean.clamp_min(1e-12)).mean()
    record("attn_cluster_size_cv", cv)
    if info.topk_mass is not None:
        mass = (info.topk_mass.to(torch.float32) * counts).sum() / counts.sum().clamp_min(1)
        record("attn_topk_mass", mass)


@torch.no_grad()
def _log_leaders(info: "ops.HardmaxInfo", qpm: Optional[Tensor]) -> None:
    """attn_hardmax_leaders: fraction of real (query, head) tokens that are in their own attention set."""
    leaders = info.leaders  # (N, H, L), False for padded queries
    heads, length = leaders.shape[1], leaders.shape[2]
    real = leaders.shape[0] * length if qpm is None else (~qpm).sum()
    fraction = leaders.sum().to(torch.float32) / (real * heads)
    record("attn_hardmax_leaders", fraction)
