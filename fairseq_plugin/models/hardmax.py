"""The pure-attention hardmax transformer of Alcalde, Fantuzzi, Zuazua (2024) for sentence classification.

    tokens -> embedding (dimension d) -> L pure-attention layers sharing ONE weight set -> mean over the
    real tokens -> linear classifier

Each layer is z_i <- (z_i + alpha * attn_i(z)) / (1 + alpha) with attn_i the hardmax attention of
DESIGN.md §2 on the scores <A z_i, z_j>, where A = B Bᵀ + eps I is symmetric positive definite and
B and alpha > 0 (through log alpha) are trained (``--train-alpha false`` fixes alpha). There is no FFN, no projection, no position
encoding: the model sees a bag of words. Training uses the low-temperature softmax
softmax(<A z_i, z_j> / T) (``--hardmax-temperature``, 0.001; scores in float32 or wider), and
``model.eval()`` the exact hardmax. Padding and the ``</s>`` that fairseq-preprocess appends take
no part in attention or pooling (the authors pad without masking; we mask).

Registered as model ``pure_attention`` for ``--task sentence_prediction`` with two named
architectures that differ only in the attention:

    hardmax_pure_attention   the paper's model (--attention-type hardmax)
    softmax_pure_attention   the same model with softmax(τ <A z_i, z_j>), τ = --softmax-temp or 1/sqrt(d)

Model options (defaults in :data:`MODEL_OPTIONS`, the one place they are set): ``--encoder-embed-dim``
(d, 16), ``--encoder-layers`` (8), ``--hardmax-alpha`` (initial alpha, 1.0), ``--train-alpha`` (true;
false keeps alpha fixed), ``--spd-eps`` (0.01),
``--embed-init-std`` (1.0); and the attention options of :mod:`fairseq_plugin.config`
(``--attention-type``, ``--hardmax-temperature``, ``--hardmax-tie-tolerance``, ``--softmax-temp``,
``--attention-stats``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from torch import Tensor, nn

from .. import ops
from ..config import AttentionConfig, add_attention_args, apply_attention_defaults
from ..modules import statistics
from ..ops.options import OPTIONS, Option, argparse_type

PURE_ATTENTION_TYPES = ("hardmax", "softmax")

_ALPHA = OPTIONS["alpha"]
# The model's own options, as the same Option records as the attention ones (fairseq_plugin.ops.options);
# alpha is the hardmax step of the functional API, with the model's initial value.
MODEL_OPTIONS: Dict[str, Option] = {
    o.name: o
    for o in (
        Option("encoder_embed_dim", int, 16, "token dimension d (the paper: 2, 4, 8 or 16)", low=1, metavar="D"),
        Option("encoder_layers", int, 8, "pure-attention layers, all sharing one weight set (A, alpha)", low=1,
               metavar="N"),
        dataclasses.replace(_ALPHA, name="hardmax_alpha", default=_ALPHA.model_default, none_means=None,
                            help=f"{_ALPHA.help}: its initial value"),
        Option("train_alpha", bool, True, "train alpha (true) or keep it fixed at --hardmax-alpha (false)",
               metavar="{true,false}"),
        Option("spd_eps", float, 0.01, "A = B Bᵀ + eps I: the floor eps > 0 on A's eigenvalues", low=0, open_low=True,
               metavar="EPS"),
        Option("embed_init_std", float, 1.0, "standard deviation of the initial token embeddings", low=0,
               open_low=True, metavar="STD"),
    )
}  # fmt: skip


class Trajectory(NamedTuple):
    """What :meth:`PureAttentionModel.trajectory` returns; ``states[0]`` is the embedding."""

    states: List[Tensor]  # layers + 1 tensors (N, L, d), zero at ignored positions
    leaders: List[Tensor]  # per layer, (N, L) bool: token i is in its own exact hardmax set
    ignored: Tensor  # (N, L) bool: padding and special tokens


class SharedPureAttention(nn.Module):
    """One pure-attention layer z <- (z + alpha attn(z)) / (1 + alpha); applied ``layers`` times."""

    def __init__(self, dim: int, cfg: AttentionConfig, alpha: float, spd_eps: float, train_alpha: bool = True):
        super().__init__()
        self.cfg = cfg
        self.spd_eps = spd_eps
        self.factor = nn.Parameter(torch.eye(dim))  # B; A = B Bᵀ + eps I starts at (1 + eps) I
        # a parameter either way (same checkpoint layout); fairseq optimises only requires_grad ones
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=train_alpha)

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    def qk_matrix(self) -> Tensor:
        b = self.factor
        return b @ b.T + self.spd_eps * torch.eye(b.shape[0], dtype=b.dtype, device=b.device)  # (d, d)

    def extra_repr(self) -> str:
        cfg = self.cfg
        extra = f", temperature={cfg.hardmax_temperature} (training; exact in eval)" if cfg.attention_type == "hardmax" else ""
        trained = "trained" if self.log_alpha.requires_grad else "fixed"
        return f"attention_type={cfg.attention_type}, spd_eps={self.spd_eps}, alpha {trained}{extra}"

    def forward(self, z: Tensor, ignored: Tensor, exact: bool, return_leaders: bool = False):
        """z (N, L, d), ignored (N, L) True = no part. Returns z' (N, L, d) [, leaders (N, L)]."""
        cfg = self.cfg
        a = self.qk_matrix().to(z.dtype)
        x = z.unsqueeze(1)  # (N, 1, L, d): one head
        masks = dict(key_padding_mask=ignored, query_padding_mask=ignored)
        leaders = None
        if cfg.attention_type == "softmax":
            attn = ops.full_attention(x @ a, x, x, softmax_temp=cfg.softmax_temp, **masks)  # (N, 1, L, d)
        else:
            result = ops.hardmax_attention(
                x, x, x, qk_matrix=a, temperature=None if exact else cfg.hardmax_temperature,
                tie_tolerance=cfg.hardmax_tie_tolerance, return_leaders=return_leaders, **masks,
            )  # fmt: skip
            attn, leaders = (result[0], result[1].leaders[:, 0]) if return_leaders else (result, None)
        alpha = self.alpha.to(z.dtype)
        out = (z + alpha * attn[:, 0]) / (1 + alpha)  # (N, L, d)
        out = out.masked_fill(ignored.unsqueeze(-1), 0.0)
        return (out, leaders) if return_leaders else out


@register_model("pure_attention")
class PureAttentionModel(BaseFairseqModel):
    """Embedding -> shared pure-attention layers -> mean over real tokens -> classification heads."""

    def __init__(self, args: Any, dictionary):
        super().__init__()
        self.args = args
        self.attention_cfg = AttentionConfig.from_args(args)
        if self.attention_cfg.attention_type not in PURE_ATTENTION_TYPES:
            raise ValueError(
                f"--attention-type {self.attention_cfg.attention_type} is not available in the pure-attention "
                f"model; choose one of {', '.join(PURE_ATTENTION_TYPES)}"
            )
        values = {}
        for name, opt in MODEL_OPTIONS.items():
            try:
                values[name] = opt.parse(getattr(args, name))
            except ValueError as err:
                raise ValueError(f"--{name.replace('_', '-')} {err}") from None
        dim, layers = values["encoder_embed_dim"], values["encoder_layers"]
        self.dictionary = dictionary
        self.num_layers = layers
        self.special = sorted({dictionary.pad(), dictionary.eos(), dictionary.bos()})
        self.embed_tokens = nn.Embedding(len(dictionary), dim, padding_idx=dictionary.pad())
        nn.init.normal_(self.embed_tokens.weight, std=values["embed_init_std"])
        with torch.no_grad():
            self.embed_tokens.weight[dictionary.pad()].zero_()
        self.layer = SharedPureAttention(dim, self.attention_cfg, values["hardmax_alpha"], values["spd_eps"],
                                         train_alpha=values["train_alpha"])  # fmt: skip
        self.classification_heads = nn.ModuleDict()
        self._max_positions = getattr(args, "max_positions", None)

    @staticmethod
    def add_args(parser) -> None:
        for name, opt in MODEL_OPTIONS.items():
            parser.add_argument(f"--{name.replace('_', '-')}", type=argparse_type(opt.parse), metavar=opt.metavar,
                                help=f"{opt.help} (default: {opt.default})")  # fmt: skip
        add_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        if getattr(args, "max_positions", None) is None:
            args.max_positions = task.max_positions()
        statistics.attach(task)
        return cls(args, task.source_dictionary)

    def max_positions(self) -> Optional[int]:
        return self._max_positions

    def register_classification_head(self, name: str, num_classes: int = 2, **unused) -> None:
        self.classification_heads[name] = nn.Linear(self.embed_tokens.embedding_dim, num_classes)

    # -- forward ---------------------------------------------------------------------------------
    def ignored(self, src_tokens: Tensor) -> Tensor:
        """(N, L) True where a position takes no part: padding, </s>, <s>."""
        ignored = torch.zeros_like(src_tokens, dtype=torch.bool)
        for index in self.special:
            ignored |= src_tokens == index
        if bool(ignored.all(-1).any()):
            raise ValueError("a sentence has no real token (only padding / special symbols)")
        return ignored

    def trajectory(self, src_tokens: Tensor, exact: Optional[bool] = None, leaders: bool = False) -> Trajectory:
        """The token states after every layer. ``exact`` defaults to ``not self.training``;
        ``leaders`` (exact hardmax only) also returns each layer's leaders."""
        exact = (not self.training) if exact is None else exact
        if leaders and not (exact and self.attention_cfg.attention_type == "hardmax"):
            raise ValueError("leaders are defined for the exact hardmax: call with exact=True on a hardmax model")
        ignored = self.ignored(src_tokens)  # (N, L)
        z = self.embed_tokens(src_tokens).masked_fill(ignored.unsqueeze(-1), 0.0)  # (N, L, d)
        states, found = [z], []
        for _ in range(self.num_layers):
            if leaders:
                z, lead = self.layer(z, ignored, exact, return_leaders=True)
                found.append(lead)
            else:
                z = self.layer(z, ignored, exact)
            states.append(z)
        return Trajectory(states, found, ignored)

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, features_only: bool = True,
                classification_head_name: Optional[str] = None, **unused):  # fmt: skip
        """Returns (logits (N, classes), extra) with a head name, else (pooled (N, d), extra)."""
        stats = self.attention_cfg.attention_stats and self.attention_cfg.attention_type == "hardmax"
        exact = not self.training
        traj = self.trajectory(src_tokens, exact=exact, leaders=stats and exact)
        real = (~traj.ignored).unsqueeze(-1).to(traj.states[-1].dtype)  # (N, L, 1)
        pooled = (traj.states[-1] * real).sum(1) / real.sum(1)  # (N, d)
        if traj.leaders:
            fraction = traj.leaders[-1].sum().to(torch.float32) / real.sum()
            statistics.record("attn_hardmax_leaders", fraction)
        extra = {"pooled": pooled}
        if classification_head_name is None:
            return pooled, extra
        return self.classification_heads[classification_head_name](pooled), extra


def base_architecture(args: Any, **attention_overrides: Any) -> None:
    """Fill what ``args`` lacks: MODEL_OPTIONS defaults, then the attention defaults."""
    for name, opt in MODEL_OPTIONS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, opt.default)
    apply_attention_defaults(args, **attention_overrides)


@register_model_architecture("pure_attention", "hardmax_pure_attention")
def hardmax_pure_attention(args: Any) -> None:
    base_architecture(args, attention_type="hardmax")


@register_model_architecture("pure_attention", "softmax_pure_attention")
def softmax_pure_attention(args: Any) -> None:
    base_architecture(args, attention_type="softmax")
