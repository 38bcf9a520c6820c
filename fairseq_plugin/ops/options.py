"""The clustering and hardmax options: one definition of each one's default, bounds and help.

Everything else derives from :data:`OPTIONS`: the keyword defaults of the functional API
(``clustered_attention``, ``improved_clustered_attention``, ``hardmax_attention``, ...), the
checks those functions make (:func:`check`), fairseq's command-line options
(:mod:`fairseq_plugin.config`), the hardmax model's ``--hardmax-alpha`` and the benchmark's parser.
An out-of-bounds value gives the same words everywhere: ``hash_bits must be an integer in 1..63
(got 64)`` from the API, ``argument --hash-bits: must be an integer in 1..63 (got 64)`` from the
command line or a sweep file. tests/ops/test_options.py checks the derived signatures against
this table and the bounds against the kernels' own checks. Nothing here imports fairseq.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

MAX_HASH_BITS = 63  # codes are packed into a signed int64; bit 63 is the sign


@dataclass(frozen=True)
class Option:
    """One option: the functional API's keyword ``name``, its default, bounds and help."""

    name: str
    kind: type  # int, float or bool
    default: Any  # the functional API's default (None where None is a value, see none_means)
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False  # the bound is > low, not >= low
    none_means: Optional[str] = None  # what None means, where it is allowed
    metavar: str = "X"
    model_default: Any = None  # a model's default, where it differs from the API's (training settings)

    @property
    def span(self) -> str:
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a number"
        if self.high is not None:
            return f"{what} in {self.low:g}..{self.high:g}"
        return f"{what} {'>' if self.open_low else '>='} {self.low:g}"

    def _fail(self, value: Any) -> ValueError:
        return ValueError(f"must be {self.span} (got {value!r})")

    def parse(self, value: Any) -> Any:
        """A command-line string or a typed value -> the typed value; ValueError("must be ...")."""
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if self.none_means is None:
                raise self._fail(value)
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise self._fail(value)
        if isinstance(value, bool):
            raise self._fail(value)
        try:
            number = self.kind(value) if isinstance(value, str) else value
        except ValueError:
            raise self._fail(value) from None
        if self.kind is int and not isinstance(number, int):
            raise self._fail(value)
        if self.kind is float:
            if not isinstance(number, (int, float)):
                raise self._fail(value)
            number = float(number)
        if number != number or (self.low is not None and (number < self.low or (self.open_low and number == self.low))):
            raise self._fail(number)
        if self.high is not None and number > self.high:
            raise self._fail(number)
        return number

    def check(self, value: Any) -> Any:
        """The functional API's check: a typed value only (TypeError otherwise), within bounds
        (ValueError naming the keyword)."""
        numeric = (int,) if self.kind is int else (int, float)
        ok_type = (
            (value is None and self.none_means is not None)
            or (self.kind is bool and isinstance(value, bool))
            or (self.kind is not bool and isinstance(value, numeric) and not isinstance(value, bool))
        )
        if not ok_type:
            extra = " or None" if self.none_means is not None else ""
            raise TypeError(f"{self.name} must be {self.span}{extra}, got {type(value).__name__}")
        try:
            return self.parse(value)
        except ValueError as err:
            raise ValueError(f"{self.name} {err}") from None


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

OPTIONS: Dict[str, Option] = {
    o.name: o
    for o in (
        Option("clusters", int, 100, "query clusters C per head for clustered / i_clustered attention "
               "(min(C, length) are used)", low=1, metavar="C"),
        Option("hash_bits", int, MAX_HASH_BITS, f"bits B of the random-hyperplane hash that queries are clustered on "
               f"(1..{MAX_HASH_BITS})", low=1, high=MAX_HASH_BITS, metavar="B"),
        Option("iterations", int, 10, "Lloyd iterations of the Hamming k-means on the query hashes (>= 0)",
               low=0, metavar="I"),
        Option("hash_bias", bool, True, "hyperplanes with a random offset (true) or through the origin (false)",
               metavar="{true,false}"),
        Option("topk", int, 32, "keys per cluster attended exactly by i_clustered attention; topk >= length is "
               "exact softmax", low=1, metavar="K"),
        Option("softmax_temp", float, None, "softmax temperature τ of softmax / clustered / i_clustered attention "
               "(None = 1/sqrt(head dim))", low=0, open_low=True, none_means="1/sqrt(head dim)", metavar="T"),
        Option("temperature", float, None, "hardmax: temperature of the low-temperature softmax used while "
               "training (evaluation uses the exact hardmax)", low=0, open_low=True,
               none_means="the exact hardmax", metavar="T", model_default=0.001),
        Option("alpha", float, None, "hardmax: step alpha > 0 of z <- (z + alpha attn(z)) / (1 + alpha)",
               low=0, open_low=True, none_means="the attention output alone (no residual step)", metavar="ALPHA",
               model_default=1.0),
        Option("tie_tolerance", float, 0.0, "hardmax: keys whose score is within this of the best one tie and "
               "share the attention (>= 0)", low=0, metavar="EPS"),
    )
}  # fmt: skip


def argparse_type(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a parser such as :meth:`Option.parse` (its ValueError text
    becomes argparse's one-line ``argument --name: must be ...``)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def check(name: str, value: Any) -> Any:
    """Check a functional-API value against its option (see :meth:`Option.check`)."""
    return OPTIONS[name].check(value)


def default(name: str) -> Any:
    return OPTIONS[name].default
