"""fairseq --user-dir plugin: encoders with softmax, clustered, i-clustered or hardmax attention.

The plugin registers itself with fairseq when fairseq loads it (``--user-dir fairseq_plugin``,
which imports this package after fairseq) or when :func:`register` is called. Registration adds
the models, architectures, tasks and criterions, the checkpoint allowlist (:mod:`.checkpoints`),
an exit hook that stops fairseq's batch-prefetch threads (:mod:`.shutdown`; without it a finished
fairseq-train can die of SIGABRT on its way out) and, only inside fairseq's own command-line
tools, one-line errors (:mod:`.cli_errors`) and the model options in ``--help`` (:mod:`.cli_help`).

Importing :mod:`fairseq_plugin.ops` alone (the functional attention API) has no side effect: it
imports no fairseq, sets no environment variable and installs no hook.
"""

import sys

__all__ = ["register"]


def register() -> None:
    """Register the plugin with fairseq (idempotent). Call it in a script or notebook that
    imports ``fairseq_plugin`` before fairseq; ``--user-dir`` does it by itself."""
    try:
        import fairseq  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"fairseq_plugin.register() needs fairseq ({err}); install it with bash scripts/setup.sh, "
            "or use fairseq_plugin.ops alone, which does not need it"
        ) from None
    from . import checkpoints, cli_errors, cli_help, criterions, models, shutdown, tasks  # noqa: F401

    checkpoints.install()
    shutdown.install()
    cli_errors.install()
    cli_help.install()


if sys.modules.get("fairseq") is not None:  # imported by fairseq (--user-dir) or after it
    register()
