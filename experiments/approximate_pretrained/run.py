"""Does a pretrained encoder keep its accuracy with 25-cluster attention and no retraining?

The claim (Vyas et al. 2020, DESIGN.md §8): replacing the softmax attention of a pretrained
RoBERTa by improved-clustered attention with 25 clusters keeps its GLUE accuracy, plain clustered
attention loses it. Tested here on all-MiniLM-L6-v2 (see :mod:`minilm`) and the sentiment
snippets of experiments/sentiment_data.py (Rotten Tomatoes, Amazon, tweets; split seed 0):

1. The FULL (softmax) model embeds the train split; a logistic regression (standardised
   features, L2 strength by 5-fold CV) is fitted on those frozen embeddings, per kind of input.
2. The test split is embedded by the full model and, with the same weights, by clustered and
   i_clustered attention (25 clusters, topk 32), each with a few seeds (the clustering is random:
   hash planes, k-means initialisation). Reported: the classifier's accuracy on each, its
   agreement with the full model's predictions, and the cosine similarity of each embedding to
   the full model's. Sentences are bucketed by length; documents of same-label sentences of up to
   128 / 256 / 512 tokens show where the approximation bites (with L <= C tokens, clustered
   attention has one cluster per query available; with L <= topk, i_clustered is exact).
3. A sweep of clusters and topk on one corpus and document length.

    nice -n 10 .venv/bin/python -m experiments.approximate_pretrained.run            # full run
    .venv/bin/python -m experiments.approximate_pretrained.run --out DIR --limit 300 ...  # smaller

Writes DIR/results.csv (one row per corpus, input kind, length bucket, attention, seed),
DIR/results.md (mean ± std over seeds), DIR/sweep.csv, DIR/by_length.png, DIR/sweep.png and
DIR/run.json (arguments, wall time, machine, commit). Embeddings are cached under DIR/cache, so
an interrupted run resumes, and a rerun with the same arguments only prints the table again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..machine import cpu_model
from . import inputs as inp
from .minilm import MiniLMError, load_encoder, load_tokenizer, model_dir

DEFAULT_OUT = Path("outputs/approximate_pretrained")
CORPORA = ("movie", "amazon", "tweets")


@dataclass(frozen=True)
class Arm:
    """One attention configuration of the same pretrained weights."""

    attention: str  # softmax, clustered or i_clustered
    clusters: int = 0
    topk: int = 0

    @property
    def random(self) -> bool:
        return self.attention != "softmax"

    def options(self) -> Dict[str, int]:
        opts: Dict[str, int] = {}
        if self.random:
            opts["clusters"] = self.clusters
        if self.attention == "i_clustered":
            opts["topk"] = self.topk
        return opts

    def slug(self) -> str:
        return "-".join([self.attention, *(f"{k}{v}" for k, v in self.options().items())])


FULL = Arm("softmax")


def log(message: str) -> None:
    print(f"[approximate_pretrained] {message}", file=sys.stderr, flush=True)


class Embedder:
    """Sentence embeddings of one arm for a list of token-id sequences, cached on disk.

    Sequences are batched by length (at most ``batch_tokens`` padded tokens a batch). The
    clustering draws from torch's global generator, seeded with ``seed`` before the first batch,
    so (arm, inputs, seed, batch_tokens) fixes the result; the cache key covers all four.
    """

    def __init__(self, cache: Path, batch_tokens: int):
        self.cache, self.batch_tokens = cache, batch_tokens
        self.models: Dict[Arm, torch.nn.Module] = {}
        cache.mkdir(parents=True, exist_ok=True)

    def model(self, arm: Arm) -> torch.nn.Module:
        if arm not in self.models:
            self.models[arm] = load_encoder(arm.attention, **arm.options())
        return self.models[arm]

    def __call__(self, arm: Arm, ids: Sequence[Sequence[int]], seed: int, what: str) -> np.ndarray:
        seed = seed if arm.random else 0
        digest = hashlib.sha1(json.dumps([list(map(list, ids)), self.batch_tokens]).encode()).hexdigest()[:12]
        path = self.cache / f"{what}-{arm.slug()}-seed{seed}-{digest}.npy"
        if path.is_file():
            return np.load(path)
        start = time.time()
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        model = self.model(arm)
        out = torch.empty(len(ids), model.config.hidden)
        torch.manual_seed(seed)
        pos = 0
        with torch.inference_mode():
            while pos < len(order):
                width = len(ids[order[pos]])
                size = max(1, self.batch_tokens // width)
                batch = order[pos:pos + size]
                tokens = torch.full((len(batch), width), model.config.pad_id, dtype=torch.long)
                for row, i in enumerate(batch):
                    tokens[row, : len(ids[i])] = torch.as_tensor(ids[i])
                out[batch] = model(tokens)
                pos += size
        result = out.numpy()
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, result)
        os.replace(tmp, path)  # a cache entry is complete or absent
        tokens_total = sum(len(x) for x in ids)
        log(f"embedded {what} with {arm.slug()} seed {seed}: {len(ids)} inputs, {tokens_total} tokens, "
            f"{time.time() - start:.1f} s")  # fmt: skip
        return result


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(1)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def fit_classifier(x: np.ndarray, y: Sequence[int]):
    """Standardised features, logistic regression with its L2 strength chosen by 5-fold CV on the
    training inputs (deterministic: unshuffled stratified folds, lbfgs)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y)
    if len(set(y.tolist())) < 2:
        raise ValueError("the training inputs have a single label; use more sentences (--limit)")
    folds = int(min(5, np.bincount(y).min()))
    model = LogisticRegressionCV(Cs=[1e-4, 1e-3, 1e-2, 0.1, 1.0], cv=folds, max_iter=3000)
    return make_pipeline(StandardScaler(), model).fit(x, y)


def evaluate_tier(
    args: argparse.Namespace,
    embed: Embedder,
    corpus: str,
    target: int,
    train: inp.Inputs,
    test: inp.Inputs,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    part: str,
) -> List[dict]:
    """Rows of results for one corpus and input kind: per arm, seed and length bucket."""
    tier = inp.tier_name(target)
    clf = fit_classifier(embed(FULL, train.ids, 0, f"{corpus}-{tier}-train"), train.labels)
    labels = np.asarray(test.labels)
    x_full = embed(FULL, test.ids, 0, f"{corpus}-{tier}-test")
    pred_full = clf.predict(x_full)
    lengths = np.asarray([len(x) for x in test.ids])
    groups = {"all": np.ones(len(lengths), dtype=bool)}
    if target == 0:
        buckets = np.asarray([inp.bucket_of(n) for n in lengths])
        for lo, hi in inp.LENGTH_BUCKETS:
            groups[f"{lo}-{hi}"] = buckets == f"{lo}-{hi}"
    rows = []
    for arm in [FULL, *arms]:
        for seed in seeds if arm.random else [None]:
            x = x_full if arm == FULL else embed(arm, test.ids, seed, f"{corpus}-{tier}-test")
            pred = clf.predict(x)
            cos = cosine(x, x_full)
            for name, keep in groups.items():
                if not keep.any():
                    continue
                rows.append({
                    "part": part, "corpus": corpus, "inputs": tier, "bucket": name, "attention": arm.attention,
                    "clusters": arm.clusters or "", "topk": arm.topk or "", "seed": "" if seed is None else seed,
                    "n": int(keep.sum()), "n_train": len(train.ids), "mean_tokens": round(float(lengths[keep].mean()), 1),
                    "min_tokens": int(lengths[keep].min()), "max_tokens": int(lengths[keep].max()),
                    "accuracy": float((pred[keep] == labels[keep]).mean()),
                    "agreement": float((pred[keep] == pred_full[keep]).mean()),
                    "cosine_mean": float(cos[keep].mean()), "cosine_min": float(cos[keep].min()),
                })  # fmt: skip
    return rows


def build_inputs(args, tokenizer, corpus: str):
    from experiments.sentiment_data import binary_split, load

    split = binary_split(load(corpus), seed=0)
    if args.limit:  # the first sentences of each part, in the proportions of the split
        shares = {"train": 0.8, "valid": 0.1, "test": 0.1}
        split = {name: items[: max(2, int(args.limit * shares[name]))] for name, items in split.items()}
    cls, sep = tokenizer.special_ids()
    made = {}
    for name in ("train", "test"):
        texts, labels = zip(*split[name])
        made[name] = (tokenizer.pieces(texts), list(labels))
    tiers = {}
    for target in [0, *args.doc_lengths]:
        if target == 0:
            tiers[target] = tuple(inp.sentences(*made[name], cls, sep) for name in ("train", "test"))
        else:
            train = inp.documents(*made["train"], cls, sep, target, args.train_docs, seed=1000 + target, reuse=False)
            test = inp.documents(*made["test"], cls, sep, target, args.test_docs, seed=2000 + target)
            tiers[target] = (train, test)
    return tiers


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "experiments/approximate_pretrained"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return done.stdout.strip() + ("+local changes" if dirty else "") if done.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="clustering seeds of the main table")
    p.add_argument("--clusters", type=int, default=25)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--doc-lengths", nargs="*", type=int, default=[128, 256, 512],
                   help="documents of same-label sentences up to these many tokens (<= 512)")
    p.add_argument("--train-docs", type=int, default=2000, help="training documents per length, at most (one pass over the train sentences)")
    p.add_argument("--test-docs", type=int, default=100, help="test documents per length (the test sentences are packed again, in new orders, until there are enough)")
    p.add_argument("--sweep-corpus", default="movie", choices=CORPORA)
    p.add_argument("--sweep-length", type=int, default=512, help="document length of the sweep (0 = sentences)")
    p.add_argument("--sweep-clusters", nargs="*", type=int, default=[5, 10, 25, 50, 100])
    p.add_argument("--sweep-topk", nargs="*", type=int, default=[8, 16, 32, 64])
    p.add_argument("--sweep-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--limit", type=int, default=0, help="use only the first N sentences of each corpus's split (tests)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward batch")
    args = p.parse_args(argv)
    if any(not 4 <= n <= 512 for n in args.doc_lengths) or not (args.sweep_length == 0 or args.sweep_length in args.doc_lengths):
        p.error("--doc-lengths must be in 4..512 and --sweep-length 0 or one of them")
    if args.sweep_corpus not in args.corpora:
        p.error(f"--sweep-corpus {args.sweep_corpus} is not among --corpora")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from .report import write_report

    start = time.time()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    out: Path = args.out
    done_marker = out / "run.json"
    if done_marker.is_file() and json.loads(done_marker.read_text()).get("settings") == settings:
        log(f"{out} is up to date with these settings (delete {done_marker} to recompute the tables)")
        print((out / "results.md").read_text())
        return 0
    try:
        tokenizer, _ = load_tokenizer()
        folder = model_dir()
    except MiniLMError as err:
        sys.exit(f"error: {err}")
    embed = Embedder(out / "cache", args.batch_tokens)
    main_arms = [Arm("clustered", args.clusters), Arm("i_clustered", args.clusters, args.topk)]
    rows: List[dict] = []
    for corpus in args.corpora:
        tiers = build_inputs(args, tokenizer, corpus)
        for target, (train, test) in tiers.items():
            log(f"{corpus} {inp.tier_name(target)}: {len(train.ids)} train / {len(test.ids)} test inputs, "
                f"test tokens mean {inp.stats(test.ids)[0]:.0f}")  # fmt: skip
            rows += evaluate_tier(args, embed, corpus, target, train, test, main_arms, args.seeds, "main")
            if corpus == args.sweep_corpus and target == args.sweep_length:
                sweep_arms = {Arm("clustered", c) for c in args.sweep_clusters}
                sweep_arms |= {Arm("i_clustered", c, args.topk) for c in args.sweep_clusters}
                sweep_arms |= {Arm("i_clustered", args.clusters, k) for k in args.sweep_topk}
                ordered = sorted(sweep_arms, key=lambda a: (a.attention, a.clusters, a.topk))
                rows += evaluate_tier(args, embed, corpus, target, train, test, ordered, args.sweep_seeds, "sweep")
    wall = time.time() - start
    meta = {
        "settings": settings,
        "command": " ".join([Path(sys.executable).name, "-m", "experiments.approximate_pretrained.run", *(argv or sys.argv[1:])]),
        "wall_time_s": round(wall, 1),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), {platform.python_implementation()} {platform.python_version()}",
        "commit": git_commit(),
        "model": str(folder),
    }  # fmt: skip
    write_report(out, rows, args, meta)
    done_marker.write_text(json.dumps(meta, indent=2))
    log(f"done in {wall:.0f} s: {out}/results.md, results.csv, sweep.csv, by_length.png, sweep.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
