"""Encoder, encoder layer and self-attention modules built on fairseq's hooks."""

from .attention import EfficientSelfAttention
from .encoder import EfficientTransformerEncoder
from .encoder_layer import EfficientEncoderLayer

__all__ = ["EfficientEncoderLayer", "EfficientSelfAttention", "EfficientTransformerEncoder"]
