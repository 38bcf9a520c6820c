"""Real recorded clips for a smoke check: Debian's pocketsphinx-testdata as speech_to_text splits.

The package ships ten 16 kHz recordings with transcripts under /usr/share/pocketsphinx/test/data:
``cards`` (five short card-game phrases, "eight of spades four of clubs seven of hearts") and
``librivox`` (five sentences of a LibriVox reading of Sense and Sensibility). They are turned into
features with the same code as the training data (fbank.py) and written next to a copy of the
model's dict.txt and config.yaml, so decode_ctc.py decodes them with a model trained elsewhere:

    python -m experiments.speech.prepare_pocketsphinx --vocab-from outputs/speech/data --out outputs/speech/pocketsphinx
    python experiments/speech/decode_ctc.py CHECKPOINT --data outputs/speech/pocketsphinx --split pocketsphinx

Splits: ``cards.tsv``, ``librivox.tsv`` and ``pocketsphinx.tsv`` (all ten). A model trained on the
synthetic corpus has heard no real voice and only the grammar's words: this checks that real
audio flows through the same features and decoder, not that it is recognised well.
Needs ``apt-get install pocketsphinx-testdata`` (or ``bash scripts/speech_deps.sh``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from .s2t_data import DataError, features, normalize, read_wav, save_features, units, write_manifest

TESTDATA = Path("/usr/share/pocketsphinx/test/data")
SETS = {"cards": "cards/cards.transcription", "librivox": "librivox/transcription"}
_LINE = re.compile(r"^<s>\s*(.*?)\s*</s>\s*\((\S+)\)\s*$")


def clips(testdata: Path = TESTDATA) -> dict[str, list[tuple[str, Path, str]]]:
    """``{set: [(id, wav, transcript), ...]}`` from the package's transcription files."""
    out = {}
    for name, listing in SETS.items():
        path = testdata / listing
        if not path.is_file():
            raise DataError(f"{path} not found; install the clips with 'apt-get install pocketsphinx-testdata' "
                            "(or 'bash scripts/speech_deps.sh')")  # fmt: skip
        rows = []
        for line in path.read_text().splitlines():
            match = _LINE.match(line.strip())
            if match:
                text, utt = match.groups()
                rows.append((f"{name}-{utt}", path.parent / f"{utt}.wav", normalize(text)))
        out[name] = rows
    return out


def prepare(out: Path, vocab_from: Path, testdata: Path = TESTDATA) -> Path:
    """Write the splits under ``out`` (features are cheap: always rewritten); return ``out``."""
    out, vocab_from = out.resolve(), vocab_from.resolve()
    for name in ("dict.txt", "config.yaml"):
        if not (vocab_from / name).is_file():
            raise DataError(f"{vocab_from / name} not found; --vocab-from must be the model's training data directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dict.txt", "config.yaml"):
        shutil.copyfile(vocab_from / name, out / name)
    everything = []
    for name, rows in clips(testdata).items():
        manifest = []
        for utt, wav, text in rows:
            feats = features(read_wav(wav))
            target = out / "feats" / f"{utt}.npy"
            save_features(target, feats)
            manifest.append({"id": utt, "audio": str(target), "n_frames": len(feats), "tgt_text": units(text),
                             "speaker": name})  # fmt: skip
        write_manifest(out / f"{name}.tsv", manifest)
        everything += manifest
    write_manifest(out / "pocketsphinx.tsv", everything)
    print(f"[pocketsphinx] {len(everything)} clips ({', '.join(SETS)}) in {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-from", type=Path, required=True, help="the model's training data (dict.txt, config.yaml)")
    parser.add_argument("--out", type=Path, default=Path("outputs/speech/pocketsphinx"), help="directory to write")
    parser.add_argument("--testdata", type=Path, default=TESTDATA, help="pocketsphinx-testdata's data directory")
    args = parser.parse_args(argv)
    try:
        return prepare(args.out, args.vocab_from, args.testdata)
    except DataError as err:
        raise SystemExit(f"prepare_pocketsphinx.py: error: {err}") from None


if __name__ == "__main__":
    main()
