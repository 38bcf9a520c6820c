"""AttentionConfig is the one source of the attention options: parsing, defaults, precedence."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from fairseq_plugin.config import AttentionConfig, add_attention_args, apply_attention_defaults


def fairseq_like_parser() -> argparse.ArgumentParser:
    """Model options the way fairseq adds them: a group with argument_default=SUPPRESS."""
    parser = argparse.ArgumentParser(prog="fairseq-train", exit_on_error=False)
    add_attention_args(parser.add_argument_group("model", argument_default=argparse.SUPPRESS))
    return parser


def test_every_field_is_an_option_without_argparse_default():
    parser = fairseq_like_parser()
    assert vars(parser.parse_args([])) == {}  # nothing set: the architecture fills it
    help_text = " ".join(parser.format_help().split())
    for f in dataclasses.fields(AttentionConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text and f"(default: {f.default})" in help_text, flag


def test_options_parse_to_typed_values():
    args = fairseq_like_parser().parse_args(
        "--attention-type i_clustered --clusters 25 --hash-bits 1 --cluster-iterations 0 --hash-bias false "
        "--topk 7 --softmax-temp 0.5 --hardmax-temperature 0.01 --hardmax-tie-tolerance 0 --attention-stats no".split()
    )
    assert AttentionConfig.from_args(args) == AttentionConfig(
        attention_type="i_clustered", clusters=25, hash_bits=1, cluster_iterations=0, hash_bias=False,
        topk=7, softmax_temp=0.5, hardmax_temperature=0.01, hardmax_tie_tolerance=0.0, attention_stats=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--attention-type foo", "argument --attention-type: must be one of softmax, clustered, i_clustered, hardmax (got 'foo')"),
        ("--hash-bits 64", "argument --hash-bits: must be an integer in 1..63 (got 64)"),
        ("--hash-bits 0", "argument --hash-bits: must be an integer in 1..63 (got 0)"),
        ("--clusters 0", "argument --clusters: must be an integer >= 1 (got 0)"),
        ("--clusters 2.5", "argument --clusters: must be an integer >= 1 (got '2.5')"),
        ("--topk 0", "argument --topk: must be an integer >= 1 (got 0)"),
        ("--cluster-iterations -1", "argument --cluster-iterations: must be an integer >= 0 (got -1)"),
        ("--hash-bias maybe", "argument --hash-bias: must be true or false (got 'maybe')"),
        ("--softmax-temp 0", "argument --softmax-temp: must be a number > 0 (got 0.0)"),
        ("--hardmax-temperature -1", "argument --hardmax-temperature: must be a number > 0 (got -1.0)"),
        ("--hardmax-tie-tolerance nan", "argument --hardmax-tie-tolerance: must be a number >= 0 (got nan)"),
    ],
)
def test_bad_values_are_argparse_errors_naming_option_and_range(argv, message):
    with pytest.raises(argparse.ArgumentError) as err:
        fairseq_like_parser().parse_args(argv.split())
    assert str(err.value) == message


def test_architecture_fills_only_what_is_missing():
    args = argparse.Namespace(clusters=25, topk=None)  # None counts as missing (fairseq's safe_getattr)
    apply_attention_defaults(args, attention_type="clustered", clusters=50, topk=16)
    assert (args.attention_type, args.clusters, args.topk, args.hash_bits) == ("clustered", 25, 16, 63)
    apply_attention_defaults(args, attention_type="hardmax")  # a second architecture call changes nothing
    assert args.attention_type == "clustered"


def test_command_line_beats_architecture():
    args = fairseq_like_parser().parse_args(["--attention-type", "i_clustered"])
    apply_attention_defaults(args, attention_type="clustered")
    assert AttentionConfig.from_args(args).attention_type == "i_clustered"


def test_unknown_architecture_override_is_an_error():
    with pytest.raises(TypeError, match="unknown attention option"):
        apply_attention_defaults(argparse.Namespace(), cluster=3)


def test_from_args_uses_dataclass_defaults_and_validates():
    assert AttentionConfig.from_args(argparse.Namespace()) == AttentionConfig()
    with pytest.raises(ValueError, match=r"attention option --hash-bits must be an integer in 1..63 \(got 64\)"):
        AttentionConfig.from_args(argparse.Namespace(hash_bits=64))
    with pytest.raises(ValueError, match="--attention-type must be one of"):
        AttentionConfig(attention_type="full")
