"""Encoder-only CTC speech recogniser with softmax, clustered or improved-clustered attention.

The shape of the paper's ASR models (Vyas et al. 2020): filterbank frames -> linear
projection -> sinusoidal positions -> N Transformer encoder layers -> final layer norm ->
a linear layer over the target units, trained with CTC. Attention runs over every frame (no
subsampling), so the output has one frame per input frame and the ``src_lengths`` of a
speech_to_text batch are the CTC input lengths as they stand.

    fairseq-train DATA --user-dir fairseq_plugin --task speech_to_text --config-yaml config.yaml \
        --arch i_clustered_ctc --clusters 100 --topk 32 \
        --criterion speech_ctc --post-process letter --best-checkpoint-metric wer ...

Targets and error rates: use a character vocabulary with ``|`` as the word boundary and write
``tgt_text`` as space-separated units (``t w o | s i x``); with no tokenizer in config.yaml
fairseq splits targets on whitespace. ``--post-process letter`` (the default) makes validation
report ``uer`` (unit = character error rate, ``|`` counted as the space) and ``wer``. The blank is
index 0 of the dictionary (``<s>``, never a target), as fairseq's ``ctc`` criterion assumes.

Use ``--criterion speech_ctc`` (fairseq_plugin/criterions/speech_ctc.py), not ``ctc``: speech_to_text
counts ``</s>`` in ``target_lengths`` and fairseq's ``ctc`` then fails in ``F.ctc_loss``.

Architectures: ``softmax_ctc`` (the baseline, exact softmax), ``clustered_ctc``, ``i_clustered_ctc``;
sized like the paper's WSJ encoders (9 layers, 6 heads of 32 dimensions), each setting only
what differs. Command-line options and ``arg_overrides`` at load time win over the architecture.
:func:`ctc_greedy_decode` turns a batch into transcripts (see experiments/speech/decode_ctc.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fairseq.data.data_utils import lengths_to_padding_mask, post_process
from fairseq.models import FairseqEncoder, FairseqEncoderModel, register_model
from fairseq.models.transformer import TransformerConfig
from fairseq.modules import FairseqDropout, LayerNorm, PositionalEmbedding

from ..config import (AttentionConfig, add_attention_args, add_checkpointing_args, apply_attention_defaults,
                      register_attention_architectures)  # fmt: skip
from ..criterions import speech_ctc as _speech_ctc  # noqa: F401  (the criterion this model trains with)
from ..modules import statistics
from ..modules.encoder import build_layer

CTC_BLANK = 0  # fairseq's ctc criterion: index 0 unless the task defines blank_symbol


class EfficientCTCEncoder(FairseqEncoder):
    """Frames (B, T, F) -> per-frame logits over the target dictionary (T, B, V)."""

    def __init__(self, cfg: TransformerConfig, attention_cfg: AttentionConfig, input_dim: int, dictionary):
        super().__init__(dictionary)
        dim = cfg.encoder.embed_dim
        self.max_source_positions = cfg.max_source_positions
        self.input_proj = nn.Linear(input_dim, dim)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(dim)
        # padding_idx=1 with a padding mask as input: padded frames (mask 1) get no position
        self.embed_positions = PositionalEmbedding(cfg.max_source_positions, dim, padding_idx=1)
        self.dropout_module = FairseqDropout(cfg.dropout, module_name=self.__class__.__name__)
        self.layers = nn.ModuleList([build_layer(cfg, attention_cfg) for _ in range(cfg.encoder.layers)])
        self.layer_norm = LayerNorm(dim) if cfg.encoder.normalize_before else None
        self.output_proj = nn.Linear(dim, len(dictionary))

    def forward(self, src_tokens, src_lengths):
        padding_mask = lengths_to_padding_mask(src_lengths)  # (B, T), True = padded
        x = self.embed_scale * self.input_proj(src_tokens)  # (B, T, C)
        x = x + self.embed_positions(padding_mask.long())
        x = self.dropout_module(x).transpose(0, 1)  # (T, B, C)
        for layer in self.layers:
            x = layer(x, padding_mask)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return {
            "encoder_out": self.output_proj(x),  # (T, B, V) logits; FairseqEncoderModel normalises them
            "padding_mask": padding_mask,  # (B, T)
        }

    def max_positions(self):
        return self.max_source_positions


@register_model("efficient_ctc")
class EfficientCTCModel(FairseqEncoderModel):
    """Encoder-only CTC model for ``--task speech_to_text``; ``get_normalized_probs`` (inherited)
    gives (T, B, V) log-probabilities, as fairseq's ctc criterion expects."""

    @staticmethod
    def add_args(parser):
        # Only the options this encoder honours. No argparse defaults: the architecture fills
        # sizes, TransformerConfig everything else (one source of truth).
        parser.add_argument("--encoder-embed-dim", type=int, metavar="N", help="model dimension")
        parser.add_argument("--encoder-ffn-embed-dim", type=int, metavar="N", help="feed-forward inner dimension")
        parser.add_argument("--encoder-layers", type=int, metavar="N", help="number of encoder layers")
        parser.add_argument("--encoder-attention-heads", type=int, metavar="N", help="attention heads per layer")
        parser.add_argument("--no-scale-embedding", action="store_true", help="do not scale the input by sqrt(dim)")
        parser.add_argument("--dropout", type=float, metavar="D", help="dropout probability")
        parser.add_argument("--activation-dropout", type=float, metavar="D", help="dropout after the FFN activation")
        parser.add_argument("--activation-fn", type=str, metavar="NAME", help="FFN activation (relu, gelu, ...)")
        add_checkpointing_args(parser)
        add_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        cfg = TransformerConfig.from_namespace(args)
        input_dim = args.input_feat_per_channel * args.input_channels  # set by the speech_to_text task
        encoder = EfficientCTCEncoder(cfg, AttentionConfig.from_args(args), input_dim, task.target_dictionary)
        statistics.attach(task)
        return cls(encoder)

    def forward(self, src_tokens, src_lengths, prev_output_tokens=None):
        # speech_to_text batches carry prev_output_tokens for decoders; CTC has no use for them
        return self.encoder(src_tokens, src_lengths)


@torch.no_grad()
def ctc_greedy_decode(model, sample, tgt_dict, *, blank=CTC_BLANK, post_process_symbol="letter") -> list[str]:
    """Best-path decoding of a speech_to_text batch: per-frame argmax, repeats merged, blanks
    dropped, units joined into words with fairseq's ``post_process``. One string per utterance,
    in batch order (``sample["id"]``). Call ``model.eval()`` first (dropout)."""
    net_input = sample["net_input"]
    lprobs = model.get_normalized_probs(model(**net_input), log_probs=True)  # (T, B, V)
    best = lprobs.argmax(dim=-1).transpose(0, 1).cpu()  # (B, T)
    transcripts = []
    for path, length in zip(best, net_input["src_lengths"].tolist()):
        units = path[:length].unique_consecutive()
        units = units[units != blank]
        transcripts.append(post_process(tgt_dict.string(units), post_process_symbol))
    return transcripts


def _set_missing(args, **values):
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def base_architecture(args):
    """Sized like the paper's WSJ encoders (9 pre-norm layers, 6 heads of 32 dimensions) with
    the AttentionConfig defaults; everything else is TransformerConfig's default."""
    apply_attention_defaults(args)
    _set_missing(
        args,
        encoder_embed_dim=192,
        encoder_ffn_embed_dim=768,
        encoder_layers=9,
        encoder_attention_heads=6,
        encoder_normalize_before=True,
    )


register_attention_architectures("efficient_ctc", base_architecture, "ctc", ("softmax", "clustered", "i_clustered"))
