"""The labelled sentiment snippets that work offline (DESIGN.md §7): Rotten Tomatoes, Amazon, tweets, NYT.

They ship inside the ``vaderSentiment==3.3.2`` source distribution (MIT), in
``additional_resources/hutto_ICWSM_2014.tar.gz``: ``<corpus>_GroundTruth.txt`` files with lines
``id<TAB>score<TAB>text``, the score being the mean human rating from -4 to +4. The sdist comes
from PyPI (a package registry, reachable here) once, is checked against a pinned sha256 and cached.

Labels are the sign of the score (1 = positive), zero scores dropped. The split is fixed: a
permutation of the rows drawn from ``torch.Generator().manual_seed(seed)`` (seed 0 by default),
then the first ``train`` fraction, the next ``valid`` fraction and the rest as test.

    python experiments/sentiment_data.py --corpus movie      # fetch if needed, print split sizes
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple

SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
CORPORA = {
    "movie": "movieReviewSnippets_GroundTruth.txt",  # 10,605 Rotten Tomatoes sentences (Pang & Lee)
    "amazon": "amazonReviewSnippets_GroundTruth.txt",  # 3,708
    "tweets": "tweets_GroundTruth.txt",  # 4,200
    "nyt": "nytEditorialSnippets_GroundTruth.txt",  # 5,190
}
DEFAULT_CACHE = Path(os.environ.get("SENTIMENT_DATA_CACHE", Path.home() / ".cache" / "fairseq_plugin" / "sentiment"))


class Snippet(NamedTuple):
    id: str
    score: float  # mean human rating, -4 .. +4
    text: str


class SentimentDataError(RuntimeError):
    """The snippets could not be fetched or read; the message says what to do."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """Return the directory holding the ``*_GroundTruth.txt`` files, downloading the sdist once."""
    cache = Path(cache)
    folder = cache / "hutto_ICWSM_2014"
    if all((folder / name).is_file() for name in CORPORA.values()):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / SDIST
    if not sdist.is_file():
        print(f"[sentiment] downloading {SDIST} from PyPI into {cache}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, "vaderSentiment==3.3.2"]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SDIST
            if done.returncode != 0 or not got.is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SentimentDataError(
                    f"could not download {SDIST} from PyPI ({tail[0]}); download it by hand with "
                    f"'pip download --no-deps --no-binary :all: vaderSentiment==3.3.2' and put it in {cache}"
                )
            os.replace(got, sdist)
    if _sha256(sdist) != SDIST_SHA256:
        raise SentimentDataError(f"{sdist} does not have the pinned sha256 {SDIST_SHA256}; delete it and rerun")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        with tarfile.open(sdist) as outer:
            inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
            with tarfile.open(fileobj=inner) as archive:
                for name in CORPORA.values():
                    member = archive.getmember(f"hutto_ICWSM_2014/{name}")
                    Path(tmp, name).write_bytes(archive.extractfile(member).read())
        staged = Path(tmp, "hutto_ICWSM_2014")
        staged.mkdir()
        for name in CORPORA.values():
            os.replace(Path(tmp, name), staged / name)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staged, folder)  # complete or absent, never half-written
    return folder


def load(corpus: str = "movie", cache: Path = DEFAULT_CACHE) -> List[Snippet]:
    """All snippets of one corpus (``movie``, ``amazon``, ``tweets`` or ``nyt``), in file order."""
    if corpus not in CORPORA:
        raise SentimentDataError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    path = fetch(cache) / CORPORA[corpus]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise SentimentDataError(f"{path}:{number}: expected 'id<TAB>score<TAB>text', got {line[:80]!r}")
        rows.append(Snippet(parts[0], float(parts[1]), parts[2].strip()))
    return rows


def binary_split(
    rows: List[Snippet], seed: int = 0, train: float = 0.8, valid: float = 0.1
) -> Dict[str, List[tuple]]:
    """``{"train", "valid", "test"}`` -> lists of ``(text, label)``, label = 1 if score > 0; zeros dropped."""
    import torch  # only here: the loader itself needs nothing beyond the standard library

    if not (0 < train < 1 and 0 <= valid < 1 and train + valid < 1):
        raise ValueError(f"train and valid must be fractions with train + valid < 1, got {train}, {valid}")
    labelled = [(row.text, int(row.score > 0)) for row in rows if row.score != 0]
    order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train, n_valid = int(train * len(order)), int(valid * len(order))
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    return {split: [labelled[i] for i in index] for split, index in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="movie", choices=sorted(CORPORA))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        rows = load(args.corpus, args.cache)
    except SentimentDataError as err:
        sys.exit(f"error: {err}")
    split = binary_split(rows, args.seed)
    for name, items in split.items():
        positive = sum(label for _, label in items)
        print(f"{args.corpus} {name}: {len(items)} snippets, {positive / max(len(items), 1):.1%} positive")


if __name__ == "__main__":
    main()
