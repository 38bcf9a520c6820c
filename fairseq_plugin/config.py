"""The attention options: one dataclass, the single source of truth for names, defaults and help.

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

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

ATTENTION_TYPES = ("softmax", "clustered", "i_clustered", "hardmax")


# --- value parsers: accept the CLI string or an already-typed value, raise ValueError with a
# --- message that completes "--option ..." (argparse prints it as "argument --option: ...").


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    return parse


def _int_in(lo: int, hi: Optional[int] = None) -> Callable[[Any], int]:
    span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"

    def parse(value: Any) -> int:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = int(value) if isinstance(value, str) else value
            if not isinstance(number, int):
                raise ValueError
        except ValueError:
            raise ValueError(f"must be an integer {span} (got {value!r})") from None
        if number < lo or (hi is not None and number > hi):
            raise ValueError(f"must be an integer {span} (got {number})")
        return number

    return parse


def _float_min(lo: float, *, inclusive: bool) -> Callable[[Any], float]:
    span = f">= {lo}" if inclusive else f"> {lo}"

    def parse(value: Any) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number {span} (got {value!r})") from None
        if number != number or number < lo or (number == lo and not inclusive):
            raise ValueError(f"must be a number {span} (got {value!r})")
        return number

    return parse


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return parse(value)

    return parse_optional


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"must be true or false (got {value!r})")


def _option(default: Any, help: str, parse: Callable[[Any], Any], metavar: str) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


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
    clusters: int = _option(
        100,
        "query clusters C per head for clustered / i_clustered attention (min(C, length) are used)",
        _int_in(1),
        "C",
    )
    hash_bits: int = _option(
        63, "bits B of the random-hyperplane hash that queries are clustered on (1..63)", _int_in(1, 63), "B"
    )
    cluster_iterations: int = _option(
        10, "Lloyd iterations of the Hamming k-means on the query hashes (>= 0)", _int_in(0), "I"
    )
    hash_bias: bool = _option(
        True, "hyperplanes with a random offset (true) or through the origin (false)", _bool, "{true,false}"
    )
    topk: int = _option(
        32,
        "keys per cluster attended exactly by i_clustered attention; topk >= length is exact softmax",
        _int_in(1),
        "K",
    )
    softmax_temp: Optional[float] = _option(
        None,
        "softmax temperature τ of softmax / clustered / i_clustered attention (None = 1/sqrt(head dim))",
        _optional(_float_min(0.0, inclusive=False)),
        "T",
    )
    hardmax_temperature: float = _option(
        0.001,
        "hardmax: temperature of the low-temperature softmax used while training (evaluation uses "
        "the exact hardmax)",
        _float_min(0.0, inclusive=False),
        "T",
    )
    hardmax_tie_tolerance: float = _option(
        0.0,
        "hardmax: keys whose score is within this of the best one tie and share the attention (>= 0)",
        _float_min(0.0, inclusive=True),
        "EPS",
    )
    attention_stats: bool = _option(
        True,
        "log attention statistics as fairseq metrics: attn_cluster_size_cv (clustered, i_clustered), "
        "attn_topk_mass (i_clustered), attn_hardmax_leaders (hardmax)",
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
            type=_argparse_type(f.metadata["parse"]),
            metavar=f.metadata["metavar"],
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def _argparse_type(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


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
