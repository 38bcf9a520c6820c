"""fairseq's Transformer encoder with every layer an :class:`EfficientEncoderLayer`."""

from __future__ import annotations

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from ..config import AttentionConfig
from .encoder_layer import EfficientEncoderLayer


def build_layer(cfg: TransformerConfig, attention_cfg: AttentionConfig, return_fc: bool = False):
    """An :class:`EfficientEncoderLayer`, wrapped as fairseq's TransformerEncoderBase wraps its
    layers: activation checkpointing with ``--checkpoint-activations`` (recomputed in the
    backward; the clustered layers take only tensors, so this works for every attention type),
    then FSDP (a checkpointed layer is always wrapped, whatever its size)."""
    layer = EfficientEncoderLayer(cfg, attention_cfg, return_fc=return_fc)
    checkpoint = cfg.checkpoint_activations or cfg.offload_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class EfficientTransformerEncoder(TransformerEncoder):
    """Takes the legacy ``args`` namespace like :class:`TransformerEncoder`. The attention options
    are read from ``args`` here, because ``TransformerConfig.from_namespace`` drops unknown keys."""

    def __init__(self, args, dictionary, embed_tokens, return_fc: bool = False):
        self.attention_cfg = AttentionConfig.from_args(args)  # before super() builds the layers
        super().__init__(args, dictionary, embed_tokens, return_fc=return_fc)

    def build_encoder_layer(self, cfg):
        if not isinstance(cfg, TransformerConfig):
            cfg = TransformerConfig.from_namespace(cfg)
        return build_layer(cfg, self.attention_cfg, return_fc=self.return_fc)
