"""fairseq's speech-to-text Transformer with clustered or improved-clustered encoder attention.

Only the encoder's self-attention changes: :class:`EfficientS2TTransformerEncoder` is fairseq's
``S2TTransformerEncoder`` (convolutional subsampler, positions, pre-norm layers) whose layers are
:class:`~fairseq_plugin.modules.encoder_layer.EfficientEncoderLayer`; the decoder is fairseq's.
Parameter names are those of ``s2t_transformer``, so a softmax checkpoint initialises a clustered
encoder (``--load-pretrained-encoder-from``) or reloads with another ``--attention-type``.

    fairseq-train DATA --user-dir fairseq_plugin --task speech_to_text --config-yaml config.yaml \
        --arch i_clustered_s2t_transformer --clusters 100 --topk 32 \
        --criterion label_smoothed_cross_entropy ...

Architectures, at the sizes of fairseq's ``s2t_transformer_s``; each sets only what differs:
``softmax_s2t_transformer`` (the baseline, exact softmax), ``clustered_s2t_transformer``
(``--attention-type clustered``), ``i_clustered_s2t_transformer`` (``--attention-type i_clustered``).
Command-line options and ``arg_overrides`` at load time win over the architecture.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fairseq import checkpoint_utils
from fairseq.models import register_model
from fairseq.models.speech_to_text.s2t_transformer import (
    S2TTransformerEncoder,
    S2TTransformerModel,
    s2t_transformer_s,
)
from fairseq.models.transformer import TransformerConfig

from ..cli_errors import MissingInputError
from ..config import (AttentionConfig, add_attention_args, add_checkpointing_args, apply_attention_defaults,
                      register_attention_architectures)  # fmt: skip
from ..modules import statistics
from ..modules.encoder import build_layer


class EfficientS2TTransformerEncoder(S2TTransformerEncoder):
    """``S2TTransformerEncoder`` whose ``transformer_layers`` use the configured self-attention."""

    def __init__(self, args):
        super().__init__(args)
        # S2TTransformerEncoder builds its layers inline (no build_encoder_layer hook): replace
        # them, same names and count, so state dicts stay interchangeable with s2t_transformer.
        layer_cfg = TransformerConfig.from_namespace(args)
        attention_cfg = AttentionConfig.from_args(args)
        self.transformer_layers = nn.ModuleList([build_layer(layer_cfg, attention_cfg) for _ in range(args.encoder_layers)])


@register_model("efficient_s2t_transformer")
class EfficientS2TTransformerModel(S2TTransformerModel):
    """``s2t_transformer`` with an :class:`EfficientS2TTransformerEncoder`."""

    @staticmethod
    def add_args(parser):
        S2TTransformerModel.add_args(parser)
        add_checkpointing_args(parser)
        add_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        statistics.attach(task)  # attention statistics averaged over the workers
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args):
        encoder = EfficientS2TTransformerEncoder(args)
        pretrained = getattr(args, "load_pretrained_encoder_from", None)
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise MissingInputError(
                    f"--load-pretrained-encoder-from {pretrained}: no such checkpoint; "
                    f"pass an existing s2t_transformer / efficient_s2t_transformer checkpoint or drop the option"
                )
            encoder = checkpoint_utils.load_pretrained_component_from_model(component=encoder, checkpoint=pretrained)
        return encoder


def base_architecture(args):
    """fairseq's s2t_transformer_s with the AttentionConfig defaults."""
    apply_attention_defaults(args)
    s2t_transformer_s(args)


register_attention_architectures("efficient_s2t_transformer", base_architecture, "s2t_transformer",
                                 ("softmax", "clustered", "i_clustered"))  # fmt: skip
