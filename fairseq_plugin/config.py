"""The attention options of the fairseq models: one dataclass for names, defaults and help.

The clustering and hardmax options (their defaults, bounds and help) are defined once, without
fairseq, in :data:`fairseq_plugin.ops.options.OPTIONS`; :class:`AttentionConfig` adds the
fairseq-only ones (``--attention-type``, ``--attention-stats``) and the command-line names
(``--cluster-iterations`` for ``iterations``, ``--hardmax-*`` for the hardmax ones).
Everything else derives from :class:`AttentionConfig`:

- :func:`add_attention_args` turns each field into a ``--kebab-case`` option whose help shows the
  dataclass default. It sets no argparse default, because fairseq adds model options with
  ``argument_default=SUPPRESS`` so that the ``--arch`` function can fill what the user left out.
- :func:`apply_attention_defaults` is what a named architecture calls: for every field still
  missing from ``args`` it sets the architecture's override, else the dataclass default.
  An explicit command-line value or a checkpoint's ``arg_overrides`` is already present, so it
  always wins over the architecture.
- :meth:`AttentionConfig.from_args` reads a namespace (or a fairseq DictConfig) back into a
  validated config, using the dataclass default for anything missing.

Booleans are options that take a value (``--hash-bias false``, ``--attention-stats false``)
rather than ``--no-...`` flags: a ``store_false`` action would carry an implicit argparse default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .ops.options import OPTIONS, argparse_type

ATTENTION_TYPES = ("softmax", "clustered", "i_clustered", "hardmax")


# --- value parsers: accept the CLI string or an already-typed value, raise ValueError with a
# --- message that completes "--option ..." (argparse prints it as "argument --option: ...").


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    return parse


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"must be true or false (got {value!r})")


def _option(default: Any, help: str, parse: Callable[[Any], Any], metavar: str) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


def _from_ops(name: str) -> Any:
    """A field defined by :data:`fairseq_plugin.ops.options.OPTIONS` (default, bounds, help); a
    model's default where it differs from the functional API's (the hardmax training temperature)."""
    opt = OPTIONS[name]
    default = opt.default if opt.model_default is None else opt.model_default
    return field(default=default, metadata={"help": opt.help, "parse": opt.parse, "metavar": opt.metavar})


@dataclass
class AttentionConfig:
    """Self-attention options shared by every encoder of the plugin (see DESIGN.md §2)."""

    attention_type: str = _option(
        "softmax",
        "self-attention: softmax (exact), clustered (Vyas et al. 2020), i_clustered (improved "
        "clustered: exact attention on each cluster's top-k keys) or hardmax (Alcalde et al. 2024)",
        _choice(*ATTENTION_TYPES),
        "{" + ",".join(ATTENTION_TYPES) + "}",
    )
    clusters: int = _from_ops("clusters")
    hash_bits: int = _from_ops("hash_bits")
    cluster_iterations: int = _from_ops("iterations")
    hash_bias: bool = _from_ops("hash_bias")
    topk: int = _from_ops("topk")
    softmax_temp: Optional[float] = _from_ops("softmax_temp")
    hardmax_temperature: float = _from_ops("temperature")
    hardmax_tie_tolerance: float = _from_ops("tie_tolerance")
    attention_stats: bool = _option(
        True,
        "log attention statistics as fairseq metrics, averaged over all workers: attn_cluster_size_cv "
        "(clustered, i_clustered), attn_topk_mass (i_clustered), attn_hardmax_leaders (hardmax)",
        _bool,
        "{true,false}",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, f.metadata["parse"](getattr(self, f.name)))
            except ValueError as err:
                raise ValueError(f"attention option --{_flag(f.name)} {err}") from None

    @classmethod
    def from_args(cls, args: Any) -> "AttentionConfig":
        """Read the options from an argparse Namespace or a fairseq DictConfig (missing or None
        values take the dataclass default) and validate them."""
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                values[f.name] = value
        return cls(**values)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_attention_args(parser: Any) -> None:
    """Add every :class:`AttentionConfig` field as ``--kebab-case`` (no argparse defaults)."""
    for f in dataclasses.fields(AttentionConfig):
        parser.add_argument(
            f"--{_flag(f.name)}",
            type=argparse_type(f.metadata["parse"]),
            metavar=f.metadata["metavar"],
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def add_checkpointing_args(parser: Any) -> None:
    """fairseq's activation checkpointing for the encoders built here (fairseq's RoBERTa and
    s2t models do not expose it); store-true flags, absent unless given."""
    parser.add_argument("--checkpoint-activations", action="store_true",
                        help="recompute each encoder layer's activations in the backward instead of storing them "
                             "(less memory, one more forward); works with every attention type")  # fmt: skip
    parser.add_argument("--offload-activations", action="store_true",
                        help="checkpoint activations and keep them on the CPU (implies --checkpoint-activations)")


def apply_attention_defaults(args: Any, **arch_overrides: Any) -> None:
    """Fill the attention options that ``args`` lacks (missing or None): the architecture's
    override when it gives one, else the dataclass default. Values already present win."""
    fields = {f.name: f for f in dataclasses.fields(AttentionConfig)}
    unknown = sorted(set(arch_overrides) - set(fields))
    if unknown:
        raise TypeError(f"apply_attention_defaults: unknown attention option(s) {unknown}; known: {sorted(fields)}")
    for name, f in fields.items():
        if getattr(args, name, None) is None:
            setattr(args, name, arch_overrides.get(name, f.default))


def register_attention_architectures(model: str, base: Callable[[Any], None], suffix: str,
                                     types: tuple = ATTENTION_TYPES) -> None:  # fmt: skip
    """Register ``<type>_<suffix>`` for each attention type with fairseq: the architecture sets
    only its attention type (an explicit ``--attention-type`` still wins), then ``base`` fills
    the rest (e.g. ``clustered_transformer`` = attention_type clustered + the encoder's base)."""
    from fairseq.models import register_model_architecture

    for kind in types:

        def architecture(args: Any, kind: str = kind) -> None:
            apply_attention_defaults(args, attention_type=kind)
            base(args)

        architecture.__name__ = architecture.__qualname__ = f"{kind}_{suffix}"
        register_model_architecture(model, architecture.__name__)(architecture)
