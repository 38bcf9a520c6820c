"""Multi-query associative recall (MQAR) sequences for a bidirectional encoder, from a seed.

The task of the Zoology work (Arora et al. 2023, arXiv 2312.04927), written here from its
description (DESIGN.md §7). numpy only: no fairseq, no torch.

A sequence of ``length`` tokens (symbol ids of :class:`RecallSpec`, not yet a fairseq dictionary):

    k3 v7 k0 v2 k5 v1 | _ _ k0 [v2] _ k5 [v1] _ _ _ k3 [v7] _ ...
    ---- pairs -----    ------------ queries and filler ------------

- ``num_pairs`` key-value pairs first: distinct keys from the first half of the vocabulary,
  distinct values from the second half.
- Then ``num_queries`` queries, each a key of the pairs followed by its value. The value is what
  the model predicts; the encoder sees a mask there. Every key is asked once before any key is
  asked twice (distinct keys when ``num_queries <= num_pairs``), and the queries sit at two-token
  slots drawn without replacement with probability proportional to
  ``(slot + 1) ** (query_power - 1)``: most queries come soon after the pairs, some far away.
- Every other position is filler: one ``blank`` symbol, or ``noise`` symbols drawn uniformly
  (a separate set of NOISE_SYMBOLS ids, never a key or a value).

Example ``i`` of a stream is a function of ``(seed, i)`` only, so any index is generated on its
own, in any order, on any worker, and the same seed always gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

FILLERS = ("blank", "noise")
NOISE_SYMBOLS = 8


@dataclass(frozen=True)
class RecallSpec:
    """What one MQAR sequence looks like. Symbol ids: keys ``0 .. V/2-1``, values ``V/2 .. V-1``,
    blank ``V``, noise ``V+1 .. V+NOISE_SYMBOLS`` (``V`` = ``vocab_size``)."""

    vocab_size: int = 8192
    num_pairs: int = 8
    num_queries: int = 8
    length: int = 256  # the sequence without any token the caller prepends
    query_power: float = 0.01
    filler: str = "blank"

    def problems(self, reserved: int = 0, reserved_for: str = "") -> list:
        """Every inconsistency of the options, each a phrase naming the command-line option.
        ``reserved``: tokens the caller adds to each sequence (``reserved_for`` names them)."""
        out = []
        v, p, q, n = self.vocab_size, self.num_pairs, self.num_queries, self.length
        if v < 2 or v % 2:
            out.append(f"--vocab-size must be an even integer >= 2 (half keys, half values), got {v}")
        if p < 1:
            out.append(f"--num-pairs must be >= 1, got {p}")
        elif v >= 2 and p > v // 2:
            out.append(f"--num-pairs {p} is more than the vocabulary allows: --vocab-size {v} gives "
                       f"{v // 2} distinct keys (and {v // 2} values)")  # fmt: skip
        if q < 1:
            out.append(f"--num-queries must be >= 1, got {q}")
        if p >= 1 and q >= 1 and n < 2 * (p + q):
            need = f"{2 * (p + q)} tokens"
            if reserved:
                need += f" plus {reserved} for {reserved_for or 'the caller'}, {2 * (p + q) + reserved} in all"
            out.append(f"--tokens-per-sample {n + reserved} is too short: {p} pairs and {q} queries take {need} "
                       "(raise --tokens-per-sample or lower --num-pairs / --num-queries)")
        if not self.query_power > 0:
            out.append(f"--query-power must be > 0, got {self.query_power}")
        if self.filler not in FILLERS:
            out.append(f"--filler must be one of {', '.join(FILLERS)}, got {self.filler!r}")
        return out

    @property
    def num_symbols(self) -> int:
        return self.vocab_size + 1 + NOISE_SYMBOLS

    @property
    def blank(self) -> int:
        return self.vocab_size


def chance_accuracy(spec: RecallSpec) -> Tuple[float, float]:
    """(uniform guess over the values, uniform guess over the values present in the sequence)."""
    return 2.0 / spec.vocab_size, 1.0 / spec.num_pairs


def generate(spec: RecallSpec, seed: int, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Example ``index`` of the stream ``seed``: ``(tokens, value_positions)``.

    ``tokens``: (length,) int64 symbol ids, the answers included; ``value_positions``:
    (num_queries,) int64, sorted, the positions whose token the model must predict.
    """
    rng = np.random.default_rng([seed, index])
    half, p, q = spec.vocab_size // 2, spec.num_pairs, spec.num_queries
    keys = rng.choice(half, size=p, replace=False)  # (P,)
    values = half + rng.choice(half, size=p, replace=False)  # (P,)

    if spec.filler == "blank":
        tokens = np.full(spec.length, spec.blank, dtype=np.int64)
    else:
        tokens = spec.vocab_size + 1 + rng.integers(0, NOISE_SYMBOLS, size=spec.length)
    tokens[0 : 2 * p : 2] = keys
    tokens[1 : 2 * p : 2] = values

    slots = (spec.length - 2 * p) // 2  # two-token query slots after the pairs
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (spec.query_power - 1)
    chosen = np.sort(rng.choice(slots, size=q, replace=False, p=weights / weights.sum()))  # (Q,)
    rounds = -(-q // p)  # every key once before any key twice
    which = rng.permutation(np.concatenate([rng.permutation(p) for _ in range(rounds)])[:q])  # (Q,) pair indices
    starts = 2 * p + 2 * chosen
    tokens[starts] = keys[which]
    tokens[starts + 1] = values[which]
    return tokens, starts + 1
