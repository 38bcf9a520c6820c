"""A synthetic speech corpus spoken by espeak-ng, as a speech_to_text data directory (s2t_data.py).

Text (``--text``): ``grammar`` (default), card-table sentences of 8-20 words from grammar.py (a
closed vocabulary of ~120 words; 3-9 s of speech, 320-910 frames, 550 on average; ``--words 40 80``
makes sentences of 40-80 words, 1,070-2,960 frames, 1,850 on average, where attention dominates the
encoder's cost); or ``movie``,
Rotten Tomatoes sentences of 8-30 words without digits from experiments/sentiment_data.py (open
vocabulary, much harder), split by its fixed ``binary_split`` so train, valid and test share no
sentence. Grammar sentences of valid and test never occur in train either.

Speakers: an espeak-ng accent (``en-us``, ``en-gb``, ``en-gb-scotland``, ``en-gb-x-rp``, ...)
with a voice variant (``+m3``, ``+f2``, ``+klatt``, ...). The variants are held out: train,
valid and test use disjoint sets of variants (every accent occurs in every split), so valid and
test are spoken by voices the model never heard. Each utterance also draws a speed of 130-200
words a minute, a pitch of 30-70 and white noise at 25-45 dB SNR. Pipeline:

    espeak-ng --stdout -v en-gb+f2 -s 165 -p 57 "..." | sox -t wav - -t raw -r 16000 -b 16 -e signed -
    -> noise -> 80-dim Kaldi-style fbank (fbank.py) -> DIR/feats/<split>/<id>.npy

Everything is drawn up front from ``--seed``, so the corpus does not depend on ``--jobs``.
Synthesis runs in ``--jobs`` processes (default 2). A rerun with the same arguments is a no-op; an
interrupted run keeps the features it wrote and only makes the rest.

    python -m experiments.speech.prepare_synthetic --out outputs/speech/data   # ~4,400 utterances, ~2 min
    python -m experiments.speech.prepare_synthetic --out DIR --train 40 --valid 8 --test 8 --jobs 1

Needs the Debian packages espeak-ng and sox (``bash scripts/speech_deps.sh`` or
``apt-get install espeak-ng sox``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import grammar
from .s2t_data import (DataError, extract, finish, is_prepared, normalize, save_features, saved_frames, units,
                       write_manifest)  # fmt: skip

ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = {  # disjoint voice variants per split (espeak-ng-data/voices/!v): unseen voices in valid and test
    "train": ["m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "klatt", "klatt2", "adam", "Andy", "Annie",
              "belinda", "david", "edward", "john", "linda", "steph", "paul", "robert"],
    "valid": ["m7", "f4", "klatt3", "benjamin"],
    "test": ["m8", "f5", "klatt4", "max"],
}  # fmt: skip
SPEED = (130, 200)  # words per minute (espeak-ng -s)
WORDS = (8, 20)  # words per grammar sentence by default (grammar.sentence's own default)
PITCH = (30, 70)  # espeak-ng -p, 0-99
SNR_DB = (25.0, 45.0)
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Item:
    split: str
    id: str
    text: str
    accent: str
    variant: str
    speed: int
    pitch: int
    snr_db: float
    seed: int
    path: str

    @property
    def speaker(self) -> str:
        return f"{self.accent}+{self.variant}"


def check_tools() -> None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise DataError(f"{' and '.join(missing)} not found; install them with 'apt-get install espeak-ng sox' "
                        "(or 'bash scripts/speech_deps.sh')")  # fmt: skip


def texts(kind: str, sizes: dict[str, int], seed: int, words: tuple[int, int] = WORDS) -> dict[str, list[str]]:
    rng = random.Random(seed)
    if kind == "grammar":
        span = dict(min_words=words[0], max_words=words[1])
        held_out = grammar.sentences(rng, sizes["valid"] + sizes["test"], **span)
        out = {"valid": held_out[: sizes["valid"]], "test": held_out[sizes["valid"]:]}
        out["train"] = grammar.sentences(rng, sizes["train"], exclude=set(held_out), **span)
        return out
    from experiments.sentiment_data import binary_split, load

    out = {}
    for split, rows in binary_split(load("movie"), seed=seed).items():
        spoken = (normalize(text) for text, _ in rows if not any(c.isdigit() for c in text))  # digits: unspellable
        pool = [t for t in dict.fromkeys(spoken) if 8 <= len(t.split()) <= 30]
        if len(pool) < sizes[split]:
            raise DataError(f"--text movie has {len(pool)} usable {split} sentences; ask for at most that many")
        rng.shuffle(pool)
        out[split] = pool[: sizes[split]]
    return out


def plan(out: Path, kind: str, sizes: dict[str, int], seed: int, words: tuple[int, int] = WORDS) -> list[Item]:
    rng = np.random.default_rng(seed)
    items = []
    for split, sentences in texts(kind, sizes, seed, words).items():
        for i, text in enumerate(sentences):
            utt = f"{split}-{i:05d}"
            items.append(Item(
                split=split, id=utt, text=text, accent=str(rng.choice(ACCENTS)),
                variant=str(rng.choice(VARIANTS[split])), speed=int(rng.integers(SPEED[0], SPEED[1] + 1)),
                pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)), snr_db=round(float(rng.uniform(*SNR_DB)), 1),
                seed=int(rng.integers(2**31)), path=str(out / "feats" / split / f"{utt}.npy"),
            ))  # fmt: skip
    return items


def synthesize(item: Item) -> np.ndarray:
    """16 kHz int16-range float samples of one utterance, noise added."""
    speak = ["espeak-ng", "--stdout", "-v", f"{item.accent}+{item.variant}", "-s", str(item.speed),
             "-p", str(item.pitch), item.text]  # fmt: skip
    convert = ["sox", "-q", "-t", "wav", "-", "-t", "raw", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer",
               "-", "gain", "-n", "-3"]  # fmt: skip
    wav = subprocess.run(speak, capture_output=True, check=False)
    if wav.returncode != 0 or not wav.stdout:
        raise DataError(f"espeak-ng failed for voice {item.speaker}: {wav.stderr.decode(errors='replace').strip()}")
    raw = subprocess.run(convert, input=wav.stdout, capture_output=True, check=False)
    if raw.returncode != 0:
        raise DataError(f"sox failed: {raw.stderr.decode(errors='replace').strip()}")
    samples = np.frombuffer(raw.stdout, dtype=np.int16).astype(np.float32)
    rng = np.random.default_rng(item.seed)
    noise_rms = np.sqrt(np.mean(samples**2)) / 10 ** (item.snr_db / 20)
    return samples + rng.normal(0.0, noise_rms, samples.shape).astype(np.float32)


def make(item: Item) -> tuple[str, int]:
    """Write one utterance's features unless they exist; return (id, n_frames)."""
    path = Path(item.path)
    frames = saved_frames(path)
    if frames is None:
        import torch

        torch.set_num_threads(1)  # one process per core; torch's own threads only contend
        from .s2t_data import features

        feats = features(synthesize(item))
        save_features(path, feats)
        frames = len(feats)
    return item.id, frames


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/speech/data"), help="data directory to write")
    parser.add_argument("--text", choices=["grammar", "movie"], default="grammar", help="where sentences come from")
    parser.add_argument("--train", type=int, default=4000, help="training utterances")
    parser.add_argument("--valid", type=int, default=200, help="validation utterances (unseen voices)")
    parser.add_argument("--test", type=int, default=200, help="test utterances (other unseen voices)")
    parser.add_argument("--seed", type=int, default=1, help="draws texts, voices, speeds, pitches and noise")
    parser.add_argument("--jobs", type=int, default=2, help="synthesis processes")
    parser.add_argument("--words", type=int, nargs=2, default=list(WORDS), metavar=("MIN", "MAX"),
                        help="words per grammar sentence (default 8 20: ~550 frames; 40 80: ~1,850)")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    if min(sizes.values()) < 1 or args.jobs < 1:
        parser.error("--train, --valid, --test and --jobs must be positive")
    if not 4 <= args.words[0] <= args.words[1]:
        parser.error(f"--words MIN MAX needs 4 <= MIN <= MAX (got {args.words[0]} {args.words[1]})")
    words = tuple(args.words)
    if args.text != "grammar" and words != WORDS:
        parser.error("--words applies to --text grammar only")
    out = args.out.resolve()
    settings = {"source": "espeak-ng", "text": args.text, **sizes, "seed": args.seed, "accents": ACCENTS,
                "variants": VARIANTS, "speed": list(SPEED), "pitch": list(PITCH), "snr_db": list(SNR_DB)}  # fmt: skip
    if words != WORDS:  # absent for the default, so corpora written before --words stay up to date
        settings["words"] = args.words
    try:
        if is_prepared(out, settings, SPLITS):
            print(f"[synthetic] {out} is up to date ({sum(sizes.values())} utterances); nothing to do", file=sys.stderr)
            return out
        check_tools()
        started = time.time()
        items = plan(out, args.text, sizes, args.seed, words)
        with multiprocessing.get_context("fork").Pool(args.jobs) if args.jobs > 1 else _Serial() as pool:
            frames = extract(pool, make, items, "synthetic", "utterances", chunksize=8)
        counts = {}
        for split in SPLITS:
            rows = [{"id": it.id, "audio": it.path, "n_frames": frames[it.id], "tgt_text": units(it.text),
                     "speaker": it.speaker} for it in items if it.split == split]  # fmt: skip
            counts[split] = write_manifest(out / f"{split}.tsv", rows)
            lengths = [int(r["n_frames"]) for r in rows]
            print(f"[synthetic] {split}: {len(rows)} utterances, {len({r['speaker'] for r in rows})} speakers, "
                  f"frames min/mean/max {min(lengths)}/{np.mean(lengths):.0f}/{max(lengths)}", file=sys.stderr)  # fmt: skip
        (out / "text").mkdir(exist_ok=True)
        for split in SPLITS:  # plain transcripts and voices, for reading and for other tools
            (out / "text" / f"{split}.txt").write_text(
                "".join(f"{it.id}\t{it.speaker}\t{it.speed}\t{it.pitch}\t{it.text}\n" for it in items if it.split == split)
            )
        return finish(out, "synthetic", settings, counts, [it.text for it in items if it.split == "train"], started)
    except DataError as err:
        raise SystemExit(f"prepare_synthetic.py: error: {err}") from None


class _Serial:
    """A stand-in for Pool with --jobs 1 (no worker process)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(func, items, chunksize=1):
        return map(func, items)


if __name__ == "__main__":
    main()
