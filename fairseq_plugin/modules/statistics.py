"""Attention statistics as fairseq metrics, averaged over every data-parallel worker.

The attention code calls :func:`record` with one value (a 0-d tensor) per forward and statistic.
Where the value goes depends on where the forward runs:

- Inside a task's ``train_step`` / ``valid_step``, once :func:`attach` has wrapped them (every
  model of the plugin does so in ``build_model``): the step's values are summed, and the step's
  logging output carries a sum and a count per statistic. fairseq's trainer all-reduces logging
  outputs over the workers (and zeroes a dummy batch's) before ``task.reduce_metrics``, which
  :func:`attach` also wraps to log ``sum / count`` with weight ``count``. The logged value is then
  the mean over every call on every worker, as fairseq's loss is a mean over all workers. No
  collective of our own: nothing here can deadlock, whatever the ranks' batch counts.
- Anywhere else (a module called directly, a notebook, a model built without a task): logged at
  once with ``metrics.log_scalar``, for this process only.

fairseq's fast stat sync all-reduces one dict per step, whose keys and value types must agree on
every rank. So every wrapped step adds the keys of all :data:`STATISTICS` (zeros where unused),
as Python numbers, whatever the attention type or the data.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from fairseq.logging import metrics
from torch import Tensor

STATISTICS = ("attn_cluster_size_cv", "attn_topk_mass", "attn_hardmax_leaders")

_step: Optional[Dict[str, List[Tensor]]] = None  # the values of the task step under way, by statistic


def record(name: str, value: Tensor) -> None:
    """One value of statistic ``name`` (one of :data:`STATISTICS`) from one forward call."""
    if name not in STATISTICS:
        raise ValueError(f"unknown attention statistic {name!r}; known: {', '.join(STATISTICS)}")
    if _step is None:
        metrics.log_scalar(name, value.detach(), priority=50, round=3)
    else:
        _step.setdefault(name, []).append(value.detach().to(torch.float32))


def sum_key(name: str) -> str:
    return f"{name}_sum"


def count_key(name: str) -> str:
    return f"{name}_count"


@contextlib.contextmanager
def _collecting() -> Iterator[Dict[str, List[Tensor]]]:
    global _step
    outer, _step = _step, {}
    try:
        yield _step
    finally:
        _step = outer


def _logging_entries(values: Dict[str, List[Tensor]]) -> Dict[str, float]:
    """The sums and counts of one step for every statistic, as Python numbers (one device sync)."""
    names = [name for name in STATISTICS if values.get(name)]
    sums = torch.stack([torch.stack(values[name]).sum() for name in names]).tolist() if names else []
    entries: Dict[str, float] = {}
    for name in STATISTICS:
        entries[sum_key(name)] = 0.0
        entries[count_key(name)] = 0
    for name, total in zip(names, sums):
        entries[sum_key(name)] = float(total)
        entries[count_key(name)] = len(values[name])
    return entries


def _with_statistics(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _collecting() as values:
            loss, sample_size, logging_output = step(*args, **kwargs)
        logging_output.update(_logging_entries(values))
        return loss, sample_size, logging_output

    return wrapped


def _reducing_statistics(reduce_metrics: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(reduce_metrics)
    def wrapped(logging_outputs: List[Dict[str, Any]], criterion: Any) -> None:
        reduce_metrics(logging_outputs, criterion)
        for name in STATISTICS:
            count = sum(float(log.get(count_key(name), 0)) for log in logging_outputs)
            if count > 0:
                total = sum(float(log.get(sum_key(name), 0.0)) for log in logging_outputs)
                metrics.log_scalar(name, total / count, count, priority=50, round=3)

    return wrapped


def attach(task: Any) -> None:
    """Route the attention statistics of ``task``'s train and valid steps through their logging
    outputs (see the module docstring). Idempotent; call it from a model's ``build_model``."""
    if getattr(task, "_attention_statistics", False):
        return
    task.train_step = _with_statistics(task.train_step)
    task.valid_step = _with_statistics(task.valid_step)
    task.reduce_metrics = _reducing_statistics(task.reduce_metrics)
    task._attention_statistics = True
