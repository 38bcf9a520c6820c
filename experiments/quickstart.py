"""Quickstart: train a clustered-attention RoBERTa on a synthetic corpus in about two minutes (CPU).

    .venv/bin/python experiments/quickstart.py [--out outputs/quickstart] [--minutes 2] [--clusters 16]

1. Generates a text corpus from a small probabilistic grammar, deterministically from --seed:
   sentences with number agreement ("the old dogs near a river sleep ."), grouped in paragraphs
   (one a line, up to 254 words, a tenth of them long) whose words mostly come from the
   paragraph's topic, so a masked language model has local and long-range structure to learn.
2. Binarises it with fairseq-preprocess into OUT/data-bin (a rerun with the same corpus options
   reuses it).
3. Trains --arch clustered_transformer (2 layers, 64 dims, 4 heads) on masked_lm, one paragraph
   per sample (--tokens-per-sample 256) and 16 query clusters, fewer than the tokens of most
   samples, so clustering really groups queries; for --minutes of wall-clock time, on one CPU
   thread. Each run starts afresh in OUT/checkpoints and OUT/tb.
4. Prints the validation loss, the checkpoint and the TensorBoard command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARCHS = ("softmax_transformer", "clustered_transformer", "i_clustered_transformer", "hardmax_transformer")
TOKENS_PER_SAMPLE = 256
STARTUP_SECONDS = 20  # fairseq's import and setup, not counted by --stop-time-hours

# --- the grammar: (singular, plural) forms where number matters ------------------------------
DETERMINERS = (("the", "a", "every", "this", "that", "one"), ("the", "some", "these", "those", "many", "two"))
NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("child", "children"), ("teacher", "teachers"),
         ("farmer", "farmers"), ("river", "rivers"), ("house", "houses"), ("tree", "trees"), ("idea", "ideas"),
         ("horse", "horses"), ("city", "cities")]  # fmt: skip
ADJECTIVES = ("big", "small", "red", "old", "young", "quiet", "happy", "green", "strange", "tired")
INTRANSITIVE = [("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait"), ("falls", "fall")]
TRANSITIVE = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"), ("watches", "watch"),
              ("remembers", "remember")]  # fmt: skip
PREPOSITIONS = ("near", "under", "behind", "with", "beside", "above")


class Grammar:
    """Sentences with number agreement; each paragraph has a topic (a few nouns, adjectives and
    verbs that most of its words come from), a dependency across the whole paragraph."""

    TOPIC_SHARE = 0.85  # how often a word is drawn from the paragraph's topic

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.topic = {}

    def _pick(self, kind: str, options):
        pool = self.topic[kind] if self.rng.random() < self.TOPIC_SHARE else options
        return self.rng.choice(pool)

    def noun_phrase(self, plural: bool, depth: int = 0) -> list:
        r = self.rng
        words = [r.choice(DETERMINERS[plural])]
        words += [self._pick("adjectives", ADJECTIVES) for _ in range(r.choice((0, 0, 1, 1, 2)))]
        words.append(self._pick("nouns", NOUNS)[plural])
        if depth < 2 and r.random() < 0.25:
            words += [r.choice(PREPOSITIONS)] + self.noun_phrase(r.random() < 0.4, depth + 1)
        if depth < 1 and r.random() < 0.15:  # relative clause: its verb agrees with this noun
            words += ["that"] + self.verb_phrase(plural, depth + 1)
        return words

    def verb_phrase(self, plural: bool, depth: int = 0) -> list:
        r = self.rng
        if r.random() < 0.4:
            words = [self._pick("intransitive", INTRANSITIVE)[plural]]
        else:
            words = [self._pick("transitive", TRANSITIVE)[plural]] + self.noun_phrase(r.random() < 0.4, depth + 1)
        if r.random() < 0.2:
            words += [r.choice(PREPOSITIONS)] + self.noun_phrase(r.random() < 0.4, depth + 1)
        return words

    def sentence(self) -> list:
        plural = self.rng.random() < 0.4
        words = self.noun_phrase(plural) + self.verb_phrase(plural)
        if self.rng.random() < 0.2:
            plural = self.rng.random() < 0.4
            words += ["and"] + self.noun_phrase(plural) + self.verb_phrase(plural)
        return words + ["."]

    def paragraph(self, max_words: int) -> str:
        """1-25 sentences (a tenth of the paragraphs are long), at most ``max_words`` words."""
        r = self.rng
        self.topic = {
            "nouns": r.sample(NOUNS, 3),
            "adjectives": r.sample(ADJECTIVES, 2),
            "intransitive": r.sample(INTRANSITIVE, 2),
            "transitive": r.sample(TRANSITIVE, 2),
        }
        count = r.randint(12, 25) if r.random() < 0.1 else r.randint(1, 8)
        words = []
        for _ in range(count):
            sentence = self.sentence()
            if words and len(words) + len(sentence) > max_words:
                break
            words += sentence[:max_words]
        return " ".join(words)


def log(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"quickstart: error: {message}", file=sys.stderr)
    sys.exit(1)


def make_data(out: Path, lines: int, seed: int) -> Path:
    data_bin = out / "data-bin"
    stamp = out / "data.json"
    wanted = {"lines": lines, "seed": seed, "version": 2}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (data_bin / "dict.txt").is_file():
        log(f"reusing the binarised corpus in {data_bin}")
        return data_bin
    grammar = Grammar(seed)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    sizes = {"train": lines, "valid": max(lines // 10, 20), "test": max(lines // 10, 20)}
    for split, count in sizes.items():
        (raw / f"{split}.txt").write_text("".join(grammar.paragraph(TOKENS_PER_SAMPLE - 2) + "\n" for _ in range(count)), encoding="utf-8")
    words = sum(len(line.split()) for line in (raw / "train.txt").read_text().splitlines())
    log(f"wrote a synthetic corpus: {sizes['train']} training paragraphs ({words} words) in {raw}")
    shutil.rmtree(data_bin, ignore_errors=True)
    cmd = [str(BIN / "fairseq-preprocess"), "--only-source", "--workers", "2", "--destdir", str(data_bin),
           *(arg for split in sizes for arg in (f"--{split}pref", str(raw / f"{split}.txt")))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        (out / "preprocess.log").write_text(proc.stdout + proc.stderr)
        fail(f"fairseq-preprocess failed (exit {proc.returncode}); see {out / 'preprocess.log'}")
    stamp.write_text(json.dumps(wanted))
    log(f"binarised it with fairseq-preprocess into {data_bin}")
    return data_bin


def train(args: argparse.Namespace, data_bin: Path) -> dict:
    out = args.out
    save_dir, tb_dir, log_file = out / "checkpoints", out / "tb", out / "train.log"
    for old in (save_dir, tb_dir):
        shutil.rmtree(old, ignore_errors=True)  # every run starts afresh
    train_hours = max(args.minutes * 60 - STARTUP_SECONDS, 10) / 3600
    cmd = [
        str(BIN / "fairseq-train"), str(data_bin), "--user-dir", str(REPO / "fairseq_plugin"),
        "--task", "masked_lm", "--criterion", "masked_lm", "--arch", args.arch,
        "--encoder-layers", "2", "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "256",
        "--encoder-attention-heads", "4", "--dropout", "0.0",
        "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--max-positions", str(TOKENS_PER_SAMPLE),
        "--sample-break-mode", "eos",  # one paragraph per sample: its topic is the long-range signal
        "--clusters", str(args.clusters), "--topk", str(args.topk),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr), "--clip-norm", "1.0",
        "--lr-scheduler", "fixed", "--warmup-updates", "50", "--batch-size", str(args.batch_size),
        "--max-update", str(args.max_update), "--stop-time-hours", f"{train_hours:.5f}",
        "--validate-interval-updates", str(args.validate_every), "--save-interval-updates", str(args.validate_every),
        "--validate-interval", "100000", "--save-interval", "100000", "--no-epoch-checkpoints",
        "--save-dir", str(save_dir), "--tensorboard-logdir", str(tb_dir),
        "--cpu", "--seed", str(args.seed), "--required-batch-size-multiple", "1", "--num-workers", "0",
        "--log-format", "json", "--log-interval", "10", "--no-progress-bar",
    ]  # fmt: skip
    log(f"training {args.arch} ({args.clusters} clusters, {TOKENS_PER_SAMPLE}-token samples) for "
        f"about {args.minutes:g} min; full log: {log_file}")  # fmt: skip
    # One thread: as fast for a model this small, and immune to the many-fold slowdown of
    # OpenMP threads competing for cores with other processes. OMP_NUM_THREADS overrides it.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    last_valid = None
    start = time.time()
    with log_file.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out, env=env)
        for line in proc.stdout:
            sink.write(line)
            record = _record(line)
            if record is None:
                continue
            tag, stats = record
            if tag == "train_inner":
                extra = "".join(
                    f" | {k} {stats[k]}" for k in ("attn_cluster_size_cv", "attn_topk_mass", "attn_hardmax_leaders") if k in stats
                )
                log(f"update {stats['num_updates']:>4} | loss {stats['loss']} | lr {stats['lr']}{extra} | {time.time() - start:.0f}s")
            elif tag == "valid":
                last_valid = stats
                log(f"validation after {stats['valid_num_updates']} updates: loss {stats['valid_loss']}")
        code = proc.wait()
    if code != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        print(tail, file=sys.stderr)
        fail(f"fairseq-train failed (exit {code}); the full log is {log_file}")
    if last_valid is None:
        fail(f"fairseq-train ran no validation; see {log_file}")
    return {"valid": last_valid, "save_dir": save_dir, "tb_dir": tb_dir, "seconds": time.time() - start}


def _record(line: str):
    for tag in ("train_inner", "valid"):
        marker = f"| {tag} | "
        if marker in line:
            try:
                return tag, json.loads(line.split(marker, 1)[1])
            except json.JSONDecodeError:
                return None
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "quickstart",
                        help="work directory: corpus, data-bin, checkpoints, tb (default: outputs/quickstart)")  # fmt: skip
    parser.add_argument("--arch", default="clustered_transformer", choices=ARCHS, help="(default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=2.0, help="wall-clock budget, startup included (default: %(default)s)")
    parser.add_argument("--clusters", type=int, default=16, help="query clusters per head (default: %(default)s)")
    parser.add_argument("--topk", type=int, default=32, help="keys per cluster for i_clustered (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples of 256 tokens per update (default: %(default)s)")
    parser.add_argument("--lines", type=int, default=3000, help="training paragraphs to generate (default: %(default)s)")
    parser.add_argument("--max-update", type=int, default=2000, help="stop after this many updates at the latest (default: %(default)s)")
    parser.add_argument("--validate-every", type=int, default=100, help="validate every N updates (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="corpus and training seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        parser.error(f"--minutes must be a positive number of minutes, got {args.minutes}")
    if not 1 <= args.clusters < TOKENS_PER_SAMPLE:
        parser.error(f"--clusters must be in 1..{TOKENS_PER_SAMPLE - 1} (fewer than the {TOKENS_PER_SAMPLE}-token samples), got {args.clusters}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    for name in ("topk", "max_update", "validate_every", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.lines < 100:
        parser.error(f"--lines must be at least 100 (paragraphs of training text), got {args.lines}")
    args.out = args.out.expanduser().resolve()  # absolute: fairseq runs with the work dir as cwd
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a directory (it is created if missing)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (BIN / "fairseq-train").is_file():
        fail(f"fairseq-train is not next to {sys.executable}; run with the project's .venv/bin/python (bash scripts/setup.sh)")
    args.out.mkdir(parents=True, exist_ok=True)
    data_bin = make_data(args.out, args.lines, args.seed)
    result = train(args, data_bin)
    valid = result["valid"]
    summary = {
        "arch": args.arch,
        "clusters": args.clusters,
        "valid_loss": float(valid["valid_loss"]),
        "valid_ppl": float(valid["valid_ppl"]),
        "updates": int(valid["valid_num_updates"]),
        "seconds": round(result["seconds"], 1),
        "checkpoint": str(result["save_dir"] / "checkpoint_best.pt"),
        "tensorboard": str(result["tb_dir"]),
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(f"validation loss: {summary['valid_loss']:.3f} (base 2; perplexity {summary['valid_ppl']:.2f}) "
          f"after {summary['updates']} updates of {args.arch} in {summary['seconds']:.0f}s")  # fmt: skip
    print(f"checkpoint:      {summary['checkpoint']} (last: {result['save_dir'] / 'checkpoint_last.pt'})")
    print(f"tensorboard:     {BIN / 'tensorboard'} --logdir {summary['tensorboard']}")
    print(f"summary:         {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
