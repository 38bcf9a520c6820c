"""fairseq's Transformer encoder with every layer an :class:`EfficientEncoderLayer`."""

from __future__ import annotations

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from ..config import AttentionConfig
from .encoder_layer import EfficientEncoderLayer


class EfficientTransformerEncoder(TransformerEncoder):
    """Takes the legacy ``args`` namespace like :class:`TransformerEncoder`. The attention options
    are read from ``args`` here, because ``TransformerConfig.from_namespace`` drops unknown keys."""

    def __init__(self, args, dictionary, embed_tokens, return_fc: bool = False):
        self.attention_cfg = AttentionConfig.from_args(args)  # before super() builds the layers
        super().__init__(args, dictionary, embed_tokens, return_fc=return_fc)

    def build_encoder_layer(self, cfg):
        if not isinstance(cfg, TransformerConfig):
            cfg = TransformerConfig.from_namespace(cfg)
        layer = EfficientEncoderLayer(cfg, self.attention_cfg, return_fc=self.return_fc)
        # The wrapping sequence of TransformerEncoderBase.build_encoder_layer:
        checkpoint = cfg.checkpoint_activations
        if checkpoint:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
        # a checkpointed layer is always wrapped by FSDP, whatever its size
        min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
        return fsdp_wrap(layer, min_num_params=min_params_to_wrap)
