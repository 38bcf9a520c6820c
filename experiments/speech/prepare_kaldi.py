"""Kaldi data directories (WSJ, Switchboard, ...) as a speech_to_text data directory, same features.

WSJ and Switchboard are licensed (LDC) and prepared by Kaldi's own recipes, whose standard lists
end up as Kaldi data directories: ``wav.scp`` (``<recording> <path>`` or ``<recording> <command> |``,
e.g. ``sph2pipe -f wav -p -c 1 ... |``), ``text`` (``<utterance> TRANSCRIPT``), optionally
``segments`` (``<utterance> <recording> <start s> <end s>``, Switchboard) and ``utt2spk``. This
reads them (running the pipe commands, which must write WAV to stdout), computes the same 80-dim
fbank as the synthetic corpus (fbank.py, at the data's sample rate: 16 kHz WSJ, 8 kHz Switchboard)
and writes train.tsv, valid.tsv, test.tsv, dict.txt (characters of train), config.yaml:

    # WSJ (Kaldi egs/wsj/s5: local/wsj_data_prep.sh; the paper's si284 / dev93 / eval92 lists)
    python -m experiments.speech.prepare_kaldi --out outputs/speech/wsj \
        --train KALDI/egs/wsj/s5/data/train_si284 --valid KALDI/egs/wsj/s5/data/test_dev93 \
        --test KALDI/egs/wsj/s5/data/test_eval92
    # Switchboard (egs/swbd/s5c: local/swbd1_data_prep.sh, local/eval2000_data_prep.sh)
    python -m experiments.speech.prepare_kaldi --out outputs/speech/swbd --sample-rate 8000 \
        --train KALDI/egs/swbd/s5c/data/train --valid KALDI/egs/swbd/s5c/data/train_dev \
        --test KALDI/egs/swbd/s5c/data/eval2000

Markup tokens in ``<...>`` or ``[...]`` (``<NOISE>``, ``[laughter]``) are dropped from transcripts,
the rest is normalised as everywhere (a-z, ', spaces). Kaldi ``text`` files are relative to the
machine that made them: run this where the wav.scp commands work. A rerun is a no-op.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import re
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

from .s2t_data import (DataError, extract, finish, is_prepared, normalize, save_features, saved_frames, units,
                       write_manifest)  # fmt: skip

_MARKUP = re.compile(r"<[^>]*>|\[[^\]]*\]")


def transcript(text: str) -> str:
    return normalize(_MARKUP.sub(" ", text))


def _table(path: Path, empty_ok: bool = False) -> dict[str, str]:
    """A Kaldi table: ``<key> <rest of the line>`` per line."""
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, rest = line.strip().partition(" ")
        if not rest.strip() and not empty_ok:
            raise DataError(f"{path}:{number}: expected '<key> <value>', got {line[:80]!r}")
        out[key] = rest.strip()
    return out


def scan(folder: Path) -> list[tuple[str, str, float, float, str, str]]:
    """(utterance, wav.scp entry, start s, end s (-1: whole), speaker, transcript), sorted by utterance."""
    for name in ("wav.scp", "text"):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} not found; pass Kaldi data directories (wav.scp, text, optional "
                            "segments and utt2spk), e.g. KALDI/egs/wsj/s5/data/train_si284")  # fmt: skip
    recordings = _table(folder / "wav.scp")
    texts = _table(folder / "text", empty_ok=True)
    speakers = _table(folder / "utt2spk") if (folder / "utt2spk").is_file() else {}
    if (folder / "segments").is_file():
        segments = {}
        for utt, value in _table(folder / "segments").items():
            fields = value.split()
            if len(fields) != 3:
                raise DataError(f"{folder / 'segments'}: expected '<utt> <recording> <start> <end>' for {utt}")
            segments[utt] = (fields[0], float(fields[1]), float(fields[2]))
    else:
        segments = {utt: (utt, 0.0, -1.0) for utt in texts}
    items = []
    for utt, text in sorted(texts.items()):
        if utt not in segments or segments[utt][0] not in recordings:
            raise DataError(f"{folder}: utterance {utt} has no recording in wav.scp (or segments)")
        recording, start, end = segments[utt]
        items.append((utt, recordings[recording], start, end, speakers.get(utt, recording), transcript(text)))
    return items


def read_entry(entry: str, sample_rate: int) -> np.ndarray:
    """A wav.scp entry (a path, or a command ending in ``|`` that writes WAV) -> int16 samples."""
    if entry.rstrip().endswith("|"):
        proc = subprocess.run(entry.rstrip()[:-1], shell=True, capture_output=True)
        if proc.returncode != 0:
            raise DataError(f"wav.scp command failed ({proc.stderr.decode(errors='replace').strip()[:200]}): {entry}")
        source = io.BytesIO(proc.stdout)
    else:
        source = entry
    with wave.open(source, "rb") as handle:
        if handle.getsampwidth() != 2 or handle.getframerate() != sample_rate:
            raise DataError(f"{entry}: expected 16-bit {sample_rate} Hz WAV (--sample-rate), got "
                            f"{8 * handle.getsampwidth()}-bit {handle.getframerate()} Hz")  # fmt: skip
        samples = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)
        return samples.reshape(-1, handle.getnchannels())[:, 0]


def make(job: tuple) -> tuple[str, int]:
    utt, entry, start, end, target, sample_rate = job
    frames = saved_frames(Path(target))
    if frames is None:
        import torch

        from .fbank import fbank

        torch.set_num_threads(1)
        samples = read_entry(entry, sample_rate)
        if end >= 0:
            samples = samples[int(start * sample_rate): int(end * sample_rate)]
        feats = fbank(torch.from_numpy(samples.astype(np.float32)), sample_rate).numpy()
        save_features(Path(target), feats)
        frames = len(feats)
    return utt, frames


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="data directory to write")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="Kaldi data directories for train.tsv")
    parser.add_argument("--valid", type=Path, nargs="+", required=True, help="... for valid.tsv")
    parser.add_argument("--test", type=Path, nargs="+", required=True, help="... for test.tsv")
    parser.add_argument("--sample-rate", type=int, default=16000, help="of the audio (8000 for Switchboard)")
    parser.add_argument("--jobs", type=int, default=2, help="processes")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    splits = {"train": args.train, "valid": args.valid, "test": args.test}
    settings = {"source": "kaldi", **{k: [str(p.resolve()) for p in v] for k, v in splits.items()},
                "sample_rate": args.sample_rate}  # fmt: skip
    try:
        if is_prepared(out, settings, splits):
            print(f"[kaldi] {out} is up to date; nothing to do", file=sys.stderr)
            return out
        started = time.time()
        counts, train_texts = {}, []
        listing = {split: [(f.name, *item) for f in folders for item in scan(f)] for split, folders in splits.items()}
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for split, items in listing.items():
                jobs = [(utt, entry, start, end, str(out / "feats" / name / f"{utt}.npy"), args.sample_rate)
                        for name, utt, entry, start, end, _, _ in items]  # fmt: skip
                frames = extract(pool, make, jobs, "kaldi", split)
                rows = [{"id": utt, "audio": job[4], "n_frames": frames[utt], "tgt_text": units(text),
                         "speaker": speaker} for (_, utt, _, _, _, speaker, text), job in zip(items, jobs)]  # fmt: skip
                if split == "train":
                    train_texts += [item[-1] for item in items]
                counts[split] = write_manifest(out / f"{split}.tsv", rows)
                print(f"[kaldi] {split}: {len(rows)} utterances", file=sys.stderr)
        return finish(out, "kaldi", settings, counts, train_texts, started)
    except DataError as err:
        raise SystemExit(f"prepare_kaldi.py: error: {err}") from None


if __name__ == "__main__":
    main()
