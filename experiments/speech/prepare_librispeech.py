"""LibriSpeech (already on disk) as a speech_to_text data directory, with the synthetic corpus's features.

Expects the layout of the openslr.org/12 archives once extracted:

    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt     lines "<utt-id> TRANSCRIPT"

and writes train.tsv, valid.tsv and test.tsv (each from one or more subsets), dict.txt (characters
of the train transcripts), config.yaml and 80-dim Kaldi-style fbank features (fbank.py), exactly
as prepare_synthetic.py does, so the same sweep runs on it with ``data.path=OUT``:

    python -m experiments.speech.prepare_librispeech --root /data/LibriSpeech --out outputs/speech/librispeech \
        --train train-clean-100 --valid dev-clean --test test-clean [--max-seconds 16.7] [--jobs 8]
    fairseq-sweep run experiments/speech/sweep.yaml name=speech-librispeech \
        data.path=outputs/speech/librispeech data.prepare=null budget.wall_minutes=600

The CTC models attend over every 10 ms frame (no subsampling): ``--max-seconds`` drops longer
utterances from train (not from valid/test). Reading .flac needs ``soundfile`` (pinned in
requirements/experiments.txt). A rerun with the same arguments is a no-op.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from .s2t_data import (DataError, extract, finish, is_prepared, normalize, save_features, saved_frames, units,
                       write_manifest)  # fmt: skip

SAMPLE_RATE = 16000
LAYOUT = "<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac with <speaker>-<chapter>.trans.txt"


def scan(root: Path, subset: str) -> list[tuple[str, Path, str]]:
    """(utterance id, flac path, transcript) of one subset, sorted by id; one-line errors for a wrong layout."""
    base = root / subset
    if not base.is_dir():
        raise DataError(f"no LibriSpeech subset at {base}; expected {root}/{LAYOUT} (extract the openslr.org/12 "
                        f"archive so that {base} exists, and pass its parent as --root)")  # fmt: skip
    transcripts = sorted(base.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise DataError(f"{base} holds no <speaker>/<chapter>/*.trans.txt; expected {root}/{LAYOUT}")
    items = []
    for trans in transcripts:
        for number, line in enumerate(trans.read_text().splitlines(), 1):
            if not line.strip():
                continue
            utt, _, text = line.partition(" ")
            audio = trans.parent / f"{utt}.flac"
            if not audio.is_file():
                raise DataError(f"{trans}:{number} names {utt} but {audio} is missing; expected {root}/{LAYOUT}")
            items.append((utt, audio, normalize(text)))
    return sorted(items)


def make(job: tuple[str, str, str]) -> tuple[str, int]:
    utt, audio, target = job
    frames = saved_frames(Path(target))
    if frames is None:
        import soundfile
        import torch

        from .s2t_data import features

        torch.set_num_threads(1)
        samples, rate = soundfile.read(audio, dtype="int16")
        if rate != SAMPLE_RATE or samples.ndim != 1:
            raise DataError(f"{audio}: expected mono {SAMPLE_RATE} Hz audio, got {rate} Hz, shape {samples.shape}")
        feats = features(samples.astype(np.float32))
        save_features(Path(target), feats)
        frames = len(feats)
    return utt, frames


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the directory holding the subsets (LibriSpeech/)")
    parser.add_argument("--out", type=Path, default=Path("outputs/speech/librispeech"), help="data directory to write")
    parser.add_argument("--train", nargs="+", default=["train-clean-100"], help="subsets forming train.tsv")
    parser.add_argument("--valid", nargs="+", default=["dev-clean"], help="subsets forming valid.tsv")
    parser.add_argument("--test", nargs="+", default=["test-clean"], help="subsets forming test.tsv")
    parser.add_argument("--max-seconds", type=float, default=None, help="drop longer training utterances")
    parser.add_argument("--jobs", type=int, default=2, help="decoding / feature processes")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    splits = {"train": args.train, "valid": args.valid, "test": args.test}
    settings = {"source": "librispeech", "root": str(args.root.resolve()), **splits, "max_seconds": args.max_seconds}
    try:
        try:
            import soundfile  # noqa: F401
        except (ImportError, OSError) as err:
            raise DataError(f"reading .flac needs soundfile ({err}); install it with "
                            "'pip install -c requirements/constraints.txt -r requirements/experiments.txt'") from None
        if is_prepared(out, settings, splits):
            print(f"[librispeech] {out} is up to date; nothing to do", file=sys.stderr)
            return out
        started = time.time()
        listing = {split: [(s, *item) for s in subsets for item in scan(args.root, s)] for split, subsets in splits.items()}
        counts, train_texts = {}, []
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for split, items in listing.items():
                jobs = [(utt, str(audio), str(out / "feats" / subset / f"{utt}.npy")) for subset, utt, audio, _ in items]
                frames = extract(pool, make, jobs, "librispeech", split)
                rows = []
                for (subset, utt, _, text), (_, _, target) in zip(items, jobs):
                    if split == "train" and args.max_seconds and frames[utt] > args.max_seconds * 100:
                        continue
                    rows.append({"id": utt, "audio": target, "n_frames": frames[utt], "tgt_text": units(text),
                                 "speaker": f"{subset}/{utt.split('-')[0]}"})  # fmt: skip
                    if split == "train":
                        train_texts.append(text)
                counts[split] = write_manifest(out / f"{split}.tsv", rows)
                print(f"[librispeech] {split}: {len(rows)} of {len(items)} utterances", file=sys.stderr)
        return finish(out, "librispeech", settings, counts, train_texts, started)
    except DataError as err:
        raise SystemExit(f"prepare_librispeech.py: error: {err}") from None


if __name__ == "__main__":
    main()
