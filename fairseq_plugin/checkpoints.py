"""Safe checkpoint loading: ``weights_only=True`` and an allowlist of what fairseq checkpoints hold.

torch >= 2.6 unpickles checkpoints with ``weights_only=True``: tensors, plain containers and
numbers, nothing that could run code. fairseq checkpoints hold one type outside that set, found
by ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real checkpoints of every
architecture of this plugin (tests/fairseq/test_checkpoint_safety.py keeps it honest):

* ``argparse.Namespace``: ``args`` of old-style checkpoints, and ``cfg.model`` of architectures
  registered with ``add_args`` (all of ours).

:func:`install` (run when the plugin is used with fairseq) adds exactly that type to torch's
allowlist and wraps fairseq's one loader, ``checkpoint_utils.load_checkpoint_to_cpu`` (behind
``fairseq-train --restore-file`` / ``--finetune-from-model``, ``fairseq-validate``,
``load_model_ensemble*`` and ``--load-pretrained-encoder-from``), so that a file holding any other
type is refused with :class:`UntrustedCheckpointError`, one line naming the type and the switch
below. Nothing here changes torch's default for the process.

To load a checkpoint you trust on purpose (one written by an older fairseq with more types in
it, say), name it in ``FAIRSEQ_PLUGIN_TRUST_CHECKPOINTS`` (paths separated by ``:``): that file,
and only that file, is then unpickled in full, which runs any code it carries.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

TRUST_ENV = "FAIRSEQ_PLUGIN_TRUST_CHECKPOINTS"
SAFE_GLOBALS = (argparse.Namespace,)


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a type outside the allowlist; the message is one line."""


def _names() -> str:
    return ", ".join(f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS)


def trusted(path: str | os.PathLike) -> bool:
    """Whether the user named ``path`` in ``FAIRSEQ_PLUGIN_TRUST_CHECKPOINTS``."""
    listed = [p for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p]
    here = Path(path).resolve()
    return any(Path(p).resolve() == here for p in listed)


def explain(path: str | os.PathLike, err: BaseException) -> str:
    """The one-line refusal: which type, what is allowed, how to trust the file on purpose."""
    text = str(err)
    found = re.search(r"GLOBAL (\S+)", text) or re.search(r"Unsupported global: (\S+)", text)
    what = f"the type {found.group(1)}" if found else f"something weights_only loading rejects ({text.splitlines()[0]})"
    return (
        f"refusing to load checkpoint {path}: it holds {what}, which is outside the allowlist ({_names()}) and "
        f"could run code when unpickled; if you trust this file, set {TRUST_ENV}={Path(path).resolve()}"
    )


@contextlib.contextmanager
def _full_unpickling() -> Iterator[None]:
    """torch.load calls without an explicit weights_only unpickle in full inside the block (for a
    file the user trusts; fairseq's loader passes no weights_only, so torch's switch is the way)."""
    name, before = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a checkpoint with the allowlist (or in full, if the user trusts it)."""
    if trusted(path):
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpointError(explain(path, err)) from None


def guard(loader: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a fairseq loader whose first argument is the checkpoint path (see the module doc)."""
    if getattr(loader, "_fairseq_plugin_guard", False):
        return loader

    @functools.wraps(loader)
    def guarded(path, *args, **kwargs):
        if trusted(path):
            with _full_unpickling():
                return loader(path, *args, **kwargs)
        try:
            return loader(path, *args, **kwargs)
        except UntrustedCheckpointError:
            raise
        except pickle.UnpicklingError as err:
            raise UntrustedCheckpointError(explain(path, err)) from None

    guarded._fairseq_plugin_guard = True  # type: ignore[attr-defined]
    return guarded


def from_rank0(receive: Callable[..., Any]) -> Callable[..., Any]:
    """Replace fairseq's ``_broadcast_object_slow``: with more than one rank, rank 0 alone loads the
    checkpoint (through the allowlist) and sends its state to the others as a ``torch.save``
    buffer, which fairseq's receivers ``torch.load`` with torch's default, ``weights_only``. That
    state holds the cfg as omegaconf objects and fairseq's tensor placeholders, which the default
    refuses, so every multi-rank resume failed. The bytes are this job's own rank 0's, sent over its
    process group, so the receivers unpickle them in full, with an explicit ``weights_only=False`` on
    that one in-memory buffer (nothing process-wide changes, not even while waiting). The sender's
    side is fairseq's own code."""
    if getattr(receive, "_fairseq_plugin_guard", False):
        return receive
    from fairseq.distributed import utils as distributed_utils

    @functools.wraps(receive)
    def receiving(obj: Any, src_rank: int, group: object, dist_device: torch.device) -> Any:
        if distributed_utils.get_rank(group) == src_rank:
            return receive(obj, src_rank, group, dist_device)
        length = torch.LongTensor([0]).to(dist_device)
        distributed_utils.broadcast(length, src=src_rank, group=group)
        buffer = torch.ByteTensor(int(length.item())).to(dist_device)
        distributed_utils.broadcast(buffer, src=src_rank, group=group)
        return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)

    receiving._fairseq_plugin_guard = True  # type: ignore[attr-defined]
    return receiving


def install() -> None:
    """Allow fairseq's checkpoint types and guard fairseq's loader. Idempotent."""
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
    checkpoint_utils.load_checkpoint_to_cpu = guard(checkpoint_utils.load_checkpoint_to_cpu)
    distributed_utils._broadcast_object_slow = from_rank0(distributed_utils._broadcast_object_slow)
