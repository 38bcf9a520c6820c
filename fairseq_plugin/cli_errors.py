"""One-line errors for the fairseq command-line tools: missing inputs, refused checkpoints.

fairseq reports a missing data directory, dictionary or config.yaml as a FileNotFoundError
with a long traceback. When the plugin is loaded by a ``fairseq-*`` command, this hook prints
one line that names the missing path and what to do instead; a checkpoint refused by the
allowlist (:mod:`.checkpoints`) is one line too. Set ``FAIRSEQ_PLUGIN_TRACEBACK=1`` to get the
full traceback back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .checkpoints import UntrustedCheckpointError


class MissingInputError(FileNotFoundError):
    """A missing input the plugin itself found; its message is the whole one-line error."""


def _describe(exc: FileNotFoundError) -> str:
    path = exc.filename or (exc.args[-1] if exc.args else "")
    text = str(path)
    # fairseq sometimes raises FileNotFoundError("Dict not found: <path>") or "<path> not found"
    for prefix in ("Dict not found: ",):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.removesuffix(" not found")
    missing = Path(text)
    parent = missing.parent
    if text and not parent.exists():
        where = f"the directory {parent} does not exist"
    else:
        where = f"{missing} does not exist"
    return (
        f"{where}: pass a data directory made by fairseq-preprocess (text) or the speech data "
        f"preparation (manifests, vocabulary, config.yaml), or fix the path"
    )


def _hook(exc_type, exc, tb, _previous=sys.excepthook):
    if os.environ.get("FAIRSEQ_PLUGIN_TRACEBACK") or not issubclass(exc_type, (FileNotFoundError, UntrustedCheckpointError)):
        _previous(exc_type, exc, tb)
        return
    prog = os.path.basename(sys.argv[0]) or "fairseq"
    own = issubclass(exc_type, (UntrustedCheckpointError, MissingInputError))
    what = str(exc) if own else _describe(exc)
    print(f"{prog}: error: {what} (FAIRSEQ_PLUGIN_TRACEBACK=1 shows the traceback)", file=sys.stderr)


def install() -> None:
    """Install the hook, only inside fairseq's own command-line tools."""
    if os.path.basename(sys.argv[0]).startswith("fairseq-") and sys.excepthook is not _hook:
        sys.excepthook = _hook
