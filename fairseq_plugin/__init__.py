"""fairseq --user-dir plugin: encoders with softmax, clustered, i-clustered or hardmax attention.

Importing the package registers the models, architectures and criterions with fairseq and,
only inside fairseq's own command-line tools, installs one-line errors for missing inputs
(cli_errors) and the model options in ``--help`` (cli_help). Without fairseq installed only
:mod:`fairseq_plugin.ops` is usable (e.g. a GPU machine that runs the kernels' tests).
"""

import os
from importlib.util import find_spec

# torch >= 2.6 loads with weights_only=True, which rejects the argparse.Namespace inside fairseq
# checkpoints (DESIGN.md §5). setdefault: a user's explicit choice stands.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

if find_spec("fairseq") is not None:
    from . import cli_errors, cli_help, criterions, models  # noqa: E402,F401

    cli_errors.install()
    cli_help.install()
