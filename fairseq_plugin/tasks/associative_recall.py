"""``--task associative_recall``: multi-query associative recall for the bidirectional encoders.

Sequences come from :mod:`.mqar`, generated on the fly from a seed per split (no data
directory, no preprocessing). Each sample is ``<s>`` followed by ``--tokens-per-sample - 1``
MQAR tokens; the value after every query key is replaced by ``<mask>`` and is the target, so
the ``*_transformer`` models (``efficient_roberta``) predict it with their masked-LM head
(``--predict-at value``). ``--predict-at key`` reads the answer at the query key's own position
instead (the value stays masked), which needs one attention composition fewer and is learned far
sooner (docs/results.md section 5).
``--criterion associative_recall`` is cross-entropy on those positions and logs ``accuracy``
(per query, in percent).

    fairseq-train --user-dir fairseq_plugin --task associative_recall \
        --criterion associative_recall --arch i_clustered_transformer \
        --vocab-size 256 --num-pairs 16 --num-queries 16 --tokens-per-sample 512 --max-positions 512 ...

The positional data directory is optional and unused (launchers that always pass one may).
Inconsistent options are one-line errors before anything is built (fairseq-* tools) or a
ValueError (library use).
"""

import argparse
import atexit
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq.data import Dictionary, FairseqDataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task

from .mqar import FILLERS, NOISE_SYMBOLS, RecallSpec, generate

# fairseq-train lists the data directory (for stray valid* files) even when a task reads none: the
# default is a directory that exists and holds no such file.
NO_DATA = os.path.dirname(os.path.abspath(__file__))
CRITERIA = ("associative_recall", "masked_lm")  # criteria that read the masked targets
# "value": the masked value is the target (the model must find the key before it, then that key's
# pair: composition on both sides of the second layer, a long plateau at ~1/num_pairs); "key": the
# query key's own position is the target (one composition, as in causal MQAR; learns much faster).
PREDICT_AT = ("value", "key")


def option_error(message: str) -> None:
    """One line ``<tool>: error: ...`` and exit 2 inside fairseq's tools; a ValueError elsewhere."""
    prog = os.path.basename(sys.argv[0])
    if prog.startswith("fairseq-") and not os.environ.get("FAIRSEQ_PLUGIN_TRACEBACK"):
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ValueError(message)


@dataclass
class AssociativeRecallConfig(FairseqDataclass):
    data: str = field(
        default=NO_DATA,
        metadata={"help": "optional and unused: sequences are generated from the seeds"},
    )
    vocab_size: int = field(
        default=8192,
        metadata={"help": "key and value tokens (even): the first half are keys, the second half values"},
    )
    num_pairs: int = field(
        default=8,
        metadata={"help": "key-value pairs at the start of each sequence (distinct keys, at most vocab-size / 2)"},
    )
    num_queries: int = field(
        default=8,
        metadata={"help": "queries per sequence: a key of the pairs whose value (masked) the model predicts"},
    )
    tokens_per_sample: int = field(
        default=256,
        metadata={"help": "sequence length including <s>; filler tokens fill what the pairs and queries leave; "
                          "at most --max-positions"},
    )
    query_power: float = field(
        default=0.01,
        metadata={"help": "query slots are drawn with probability (slot + 1) ** (query-power - 1): "
                          "small = queries near the pairs, 1 = uniform"},
    )
    filler: ChoiceEnum(FILLERS) = field(
        default="blank",
        metadata={"help": f"the other positions: one blank token, or noise drawn from {NOISE_SYMBOLS} "
                          "distractor tokens"},
    )
    predict_at: ChoiceEnum(PREDICT_AT) = field(
        default="value",
        metadata={"help": "where each query's answer is predicted: at its masked value position, or at the query "
                          "key's own position (the value stays masked; the layout of causal MQAR)"},
    )
    train_size: int = field(
        default=20000,
        metadata={"help": "sequences in the train stream (one epoch)"},
    )
    valid_size: int = field(
        default=500,
        metadata={"help": "sequences in the valid stream"},
    )
    test_size: int = field(
        default=500,
        metadata={"help": "sequences in the test stream"},
    )
    train_seed: int = field(
        default=1,
        metadata={"help": "seed of the train stream (independent of --seed, which seeds the model)"},
    )
    valid_seed: int = field(
        default=2,
        metadata={"help": "seed of the valid stream"},
    )
    test_seed: int = field(
        default=3,
        metadata={"help": "seed of the test stream"},
    )


class RecallDataset(FairseqDataset):
    """``size`` MQAR samples of one stream, each made when it is asked for."""

    def __init__(self, spec: RecallSpec, seed: int, size: int, dictionary: Dictionary, mask_idx: int,
                 predict_at: str = "value"):  # fmt: skip
        self.spec, self.seed, self.size_, self.dictionary, self.mask_idx = spec, seed, size, dictionary, mask_idx
        self.shift = {"value": 0, "key": -1}[predict_at]  # target position relative to the masked value
        self.offset = dictionary.nspecial  # symbol id s is dictionary index nspecial + s
        self.sizes = np.full(size, spec.length + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self.size_

    def __getitem__(self, index: int) -> dict:
        tokens, answers = generate(self.spec, self.seed, index)
        source = torch.from_numpy(tokens + self.offset)
        target = torch.full_like(source, self.dictionary.pad())
        target[answers + self.shift] = source[answers]
        source[answers] = self.mask_idx  # the value is hidden in both modes
        source = torch.cat([source.new_tensor([self.dictionary.bos()]), source])  # (T,)
        target = torch.cat([target.new_tensor([self.dictionary.pad()]), target])  # (T,)
        return {"id": index, "source": source, "target": target}

    def collater(self, samples: list) -> dict:
        if not samples:
            return {}
        source = torch.stack([s["source"] for s in samples])  # (B, T): every sample has the same length
        return {
            "id": torch.tensor([s["id"] for s in samples]),
            "nsentences": len(samples),
            "ntokens": source.numel(),
            "net_input": {"src_tokens": source, "src_lengths": torch.full((len(samples),), source.size(1))},
            "target": torch.stack([s["target"] for s in samples]),
        }

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def size(self, index: int) -> int:
        return int(self.sizes[index])


@register_task("associative_recall", dataclass=AssociativeRecallConfig)
class AssociativeRecallTask(FairseqTask):
    """MQAR for bidirectional encoders (see the module docstring)."""

    cfg: AssociativeRecallConfig

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        for action in parser._actions:  # fairseq makes `data` a required positional; ours is optional
            if action.dest == "data" and not action.option_strings:
                action.nargs, action.required = "?", False

    def __init__(self, cfg: AssociativeRecallConfig, spec: RecallSpec):
        super().__init__(cfg)
        self.spec = spec
        self.dictionary = Dictionary()
        for symbol in range(spec.num_symbols):
            half = spec.vocab_size // 2
            if symbol < half:
                name = f"k{symbol}"
            elif symbol < spec.vocab_size:
                name = f"v{symbol - half}"
            elif symbol == spec.blank:
                name = "_"
            else:
                name = f"n{symbol - spec.blank - 1}"
            self.dictionary.add_symbol(name)
        self.mask_idx = self.dictionary.add_symbol("<mask>")

    @classmethod
    def spec_of(cls, cfg) -> RecallSpec:
        """The validated sequence spec of a task config (one-line error on the first problem)."""
        spec = RecallSpec(
            vocab_size=cfg.vocab_size, num_pairs=cfg.num_pairs, num_queries=cfg.num_queries,
            length=cfg.tokens_per_sample - 1, query_power=cfg.query_power, filler=str(cfg.filler),
        )  # fmt: skip
        problems = spec.problems(reserved=1, reserved_for="<s>")
        for name in ("train_size", "valid_size", "test_size"):
            if getattr(cfg, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        if problems:
            option_error(f"--task associative_recall: {problems[0]}")
        return spec

    @classmethod
    def setup_task(cls, cfg: AssociativeRecallConfig, **kwargs):
        return cls(cfg, cls.spec_of(cfg))

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        limit = model.max_positions()
        if isinstance(limit, int) and self.cfg.tokens_per_sample > limit:
            option_error(f"--tokens-per-sample {self.cfg.tokens_per_sample} is above the model's --max-positions "
                         f"{limit}: raise --max-positions (learned positions) or shorten the sequences")  # fmt: skip
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        name = getattr(cfg, "_name", None) or getattr(cfg, "criterion", None)
        if name not in CRITERIA:
            option_error(f"--task associative_recall needs --criterion associative_recall (or masked_lm), got {name}")
        return super().build_criterion(cfg, from_checkpoint)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        stream = split.split("_")[0] if split.split("_")[0] in ("train", "valid", "test") else None
        if stream is None:
            option_error(f"--task associative_recall has the splits train, valid and test, not {split!r}")
        seed, size = getattr(self.cfg, f"{stream}_seed"), getattr(self.cfg, f"{stream}_size")
        self.datasets[split] = RecallDataset(self.spec, seed, size, self.dictionary, self.mask_idx,
                                             str(self.cfg.predict_at))  # fmt: skip

    def max_positions(self):
        return self.cfg.tokens_per_sample

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


def _print_task_help() -> None:
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]), usage=argparse.SUPPRESS, add_help=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    AssociativeRecallTask.add_args(parser.add_argument_group("Task-specific configuration (--task associative_recall)"))
    sys.stdout.write("\n" + parser.format_help())
    sys.stdout.flush()


def install_help() -> None:
    """``fairseq-train --task associative_recall --help`` also lists the task's options.

    fairseq handles ``--help`` before it adds the options of the task named by ``--task`` (the
    same first pass that hides model options, see fairseq_plugin.cli_help); print them at exit."""
    argv = sys.argv[1:]
    if not os.path.basename(sys.argv[0]).startswith("fairseq-") or not {"-h", "--help"} & set(argv):
        return
    known, _ = _TASK_ARG.parse_known_args(argv)
    if known.task == "associative_recall":
        atexit.register(_print_task_help)


_TASK_ARG = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_TASK_ARG.add_argument("--task")
