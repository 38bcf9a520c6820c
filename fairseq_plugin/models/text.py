"""RoBERTa-style text encoders with softmax, clustered, i-clustered or hardmax self-attention.

``efficient_roberta`` is fairseq's :class:`RobertaModel` (tasks masked_lm and
sentence_prediction, classification heads, learned positions up to ``--max-positions``) whose
sentence encoder is an :class:`EfficientTransformerEncoder`. Named architectures, all at
fairseq's ``roberta_base`` sizes (12 layers, 768 / 3072, 12 heads) so that they read the same
checkpoints; each sets only what differs from the base:

    softmax_transformer      the baseline: the same model with exact softmax attention
    clustered_transformer    --attention-type clustered
    i_clustered_transformer  --attention-type i_clustered
    hardmax_transformer      --attention-type hardmax

Command-line options and ``arg_overrides`` / ``--model-overrides`` at load time win over the
architecture: the architecture only fills what is missing (see fairseq_plugin.config).
"""

from __future__ import annotations

from fairseq.models import register_model
from fairseq.models.roberta import RobertaEncoder, RobertaModel, roberta_base_architecture
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_getattr, safe_hasattr
from omegaconf import OmegaConf

from ..config import add_attention_args, add_checkpointing_args, apply_attention_defaults, register_attention_architectures
from ..modules import EfficientTransformerEncoder, statistics


ENCODER_INITS = ("bert", "default")


class EfficientRobertaEncoder(RobertaEncoder):
    """RoBERTa's encoder (embeddings, LM head) around an :class:`EfficientTransformerEncoder`."""

    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = EfficientTransformerEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)
        return encoder


@register_model("efficient_roberta")
class EfficientRobertaModel(RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_checkpointing_args(parser)
        parser.add_argument("--encoder-init", choices=ENCODER_INITS, metavar="{" + ",".join(ENCODER_INITS) + "}",
                            help="initial weights: bert (RoBERTa's N(0, 0.02)) or default (each module's own "
                                 "reset_parameters, PyTorch's and fairseq's defaults: associative recall learns "
                                 "on a CPU budget only with these) (default: bert)")  # fmt: skip
        add_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        # RobertaModel.build_model with our encoder (it names RobertaEncoder directly).
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        base_architecture(args)
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        encoder = EfficientRobertaEncoder(args, task.source_dictionary)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        model = cls(args, encoder)  # RobertaModel applies init_bert_params to every module here
        statistics.attach(task)
        if args.encoder_init == "default":
            for module in model.modules():
                if module is not model and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return model


def base_architecture(args):
    """roberta_base with the AttentionConfig defaults; attention-weight dropout off (unsupported
    by the efficient kernels, and off for softmax too so that every arm is the same model)."""
    apply_attention_defaults(args)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)
    args.encoder_init = safe_getattr(args, "encoder_init", "bert")
    roberta_base_architecture(args)


register_attention_architectures("efficient_roberta", base_architecture, "transformer")
