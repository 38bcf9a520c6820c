"""A fairseq Transformer encoder layer whose self-attention is :class:`EfficientSelfAttention`."""

from __future__ import annotations

from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase

from ..config import AttentionConfig
from .attention import EfficientSelfAttention


class EfficientEncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer (residuals, layer norms, FFN unchanged); only the
    ``build_self_attention`` hook differs."""

    def __init__(self, cfg: TransformerConfig, attention_cfg: AttentionConfig, return_fc: bool = False):
        self.attention_cfg = attention_cfg  # read by build_self_attention, called from super().__init__
        super().__init__(cfg, return_fc=return_fc)

    def build_self_attention(self, embed_dim: int, cfg: TransformerConfig) -> EfficientSelfAttention:
        if cfg.encoder.xformers_att_config is not None:
            raise ValueError("--encoder-xformers-att-config cannot be combined with fairseq_plugin attention; drop it")
        return EfficientSelfAttention(
            embed_dim,
            cfg.encoder.attention_heads,
            self.attention_cfg,
            dropout=cfg.attention_dropout,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )
