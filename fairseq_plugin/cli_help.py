"""``fairseq-train --arch <ours> --help`` also lists the model's options.

fairseq's parser handles ``--help`` in its first pass, before it adds the options of the model
named by ``--arch`` (fairseq issue #701), so no model option is ever listed. When the plugin is
loaded by a ``fairseq-*`` tool whose command line asks for help and names one of the plugin's
architectures, this prints the model's options after fairseq's own help (at exit, since argparse
exits right after printing its help).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import textwrap


def _arch_from_argv(argv: list) -> str | None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--arch", "-a")
    return parser.parse_known_args(argv)[0].arch


def _print_model_help(arch: str) -> None:
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY

    model = ARCH_MODEL_REGISTRY.get(arch)
    if model is None or not model.__module__.startswith(f"{__package__}.") or not hasattr(model, "add_args"):
        return
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]), usage=argparse.SUPPRESS, add_help=False)
    group = parser.add_argument_group(
        f"Model-specific configuration (--arch {arch}, model {ARCH_MODEL_NAME_REGISTRY[arch]}; "
        "defaults are those of the model, the architecture may change them)",
        argument_default=argparse.SUPPRESS,
    )
    model.add_args(group)
    filled = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](filled)  # what the architecture sets when the command line does not
    settings = ", ".join(f"{k}={v}" for k, v in sorted(vars(filled).items()))
    footer = textwrap.fill(f"--arch {arch} sets, unless given: {settings}", width=100)
    sys.stdout.write("\n" + parser.format_help() + "\n" + footer + "\n")
    sys.stdout.flush()


def install() -> None:
    """Register the extra help, only inside fairseq's command-line tools asked for help."""
    argv = sys.argv[1:]
    if not os.path.basename(sys.argv[0]).startswith("fairseq-") or not {"-h", "--help"} & set(argv):
        return
    arch = _arch_from_argv(argv)
    if arch is not None:
        atexit.register(_print_model_help, arch)
