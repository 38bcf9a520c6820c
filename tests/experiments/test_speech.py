"""experiments/speech, reduced end to end: espeak-ng synthesis, fbank against kaldi-native-fbank, the
manifests in fairseq, the real sweep file trained for a few updates, the report's plot, test and
real-clip decoding, and the LibriSpeech recipe on a LibriSpeech-shaped tree of synthesised flac.

espeak-ng, sox and pocketsphinx-testdata are apt-installed on first use by scripts/speech_deps.sh
(root); the Python packages (kaldi-native-fbank, soundfile) come from requirements/experiments.txt.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SWEEP = REPO / "experiments" / "speech" / "sweep.yaml"
SIZES = {"train": 24, "valid": 8, "test": 8}


def run(*args, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or ENV)  # fmt: skip


@pytest.fixture(scope="session")
def speech_deps():
    proc = run("bash", REPO / "scripts" / "speech_deps.sh", timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/speech_deps.sh could not install espeak-ng, sox, pocketsphinx-testdata:\n{proc.stderr[-2000:]}")


def synthesize(text: str, voice: str = "en-gb+f2") -> np.ndarray:
    """espeak-ng through sox: 16 kHz int16 samples."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", voice, text], capture_output=True, check=True).stdout
    raw = subprocess.run(["sox", "-q", "-t", "wav", "-", "-t", "raw", "-r", "16000", "-c", "1", "-b", "16", "-e",
                          "signed-integer", "-"], input=wav, capture_output=True, check=True).stdout  # fmt: skip
    return np.frombuffer(raw, dtype=np.int16)


@pytest.fixture(scope="module")
def corpus(speech_deps, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speech") / "data"
    args = ["-m", "experiments.speech.prepare_synthetic", "--out", out, *(f"--{k}={v}" for k, v in SIZES.items()),
            "--seed", "3", "--jobs", "2"]  # fmt: skip
    proc = run(PY, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[synthetic] utterances" in proc.stderr and "wrote" in proc.stderr  # progress output
    stamp = (out / "prepare.json").stat().st_mtime_ns
    again = run(PY, *args)
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-2000:]
    assert (out / "prepare.json").stat().st_mtime_ns == stamp  # the rerun wrote nothing
    return out


def kaldi_native(samples: np.ndarray) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 80
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, samples.astype(np.float32).tolist())
    online.input_finished()
    return np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])


def test_fbank_matches_kaldi_native_fbank(speech_deps):
    from experiments.speech.fbank import fbank, num_frames
    from experiments.speech.s2t_data import read_wav

    rng = np.random.default_rng(0)
    tone = 3000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000) + rng.normal(0, 30, 8000)
    real = read_wav(Path("/usr/share/pocketsphinx/test/data/cards/005.wav"))
    for samples in (synthesize("the queen of hearts"), real, tone, rng.normal(0, 1000, 1234)):
        ours = fbank(torch.from_numpy(samples.astype(np.float32))).numpy()
        reference = kaldi_native(samples)
        assert ours.shape == reference.shape == (num_frames(len(samples)), 80)
        diff = np.abs(ours - reference)
        assert diff.max() < 0.02 and np.median(diff) < 1e-4, (diff.max(), np.median(diff))
    assert fbank(torch.zeros(399)).shape == (0, 80)  # shorter than one 25 ms window: no frame
    with pytest.raises(ValueError, match="mono"):
        fbank(torch.zeros(2, 1000))


def test_corpus_holds_out_voices_and_loads_in_fairseq(corpus):
    from fairseq import options, tasks

    from experiments.speech.s2t_data import read_manifest

    manifests = {split: read_manifest(corpus / f"{split}.tsv") for split in SIZES}
    assert {split: len(rows) for split, rows in manifests.items()} == SIZES
    variants = {split: {r["speaker"].split("+")[1] for r in rows} for split, rows in manifests.items()}
    assert not variants["train"] & variants["valid"] and not variants["train"] & variants["test"]
    assert not variants["valid"] & variants["test"]
    for rows in manifests.values():
        for row in rows:
            feats = np.load(row["audio"])
            assert feats.shape == (int(row["n_frames"]), 80) and feats.dtype == np.float32
            assert int(row["n_frames"]) >= 250 and np.isfinite(feats).all()  # long utterances, as intended

    import fairseq_plugin

    fairseq_plugin.register()  # the models and the criterion

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(corpus), "--task", "speech_to_text", "--config-yaml",
                                                "config.yaml", "--arch", "softmax_ctc", "--criterion", "speech_ctc"])  # fmt: skip
    task = tasks.setup_task(args)
    dictionary = task.target_dictionary
    for split, rows in manifests.items():
        task.load_dataset(split)
        dataset = task.dataset(split)
        assert len(dataset) == len(rows)
        item = dataset[0]
        assert item.source.shape == (int(rows[0]["n_frames"]), 80)
        assert abs(float(item.source.mean())) < 1e-3  # utterance CMVN from config.yaml
        assert dictionary.unk() not in item.target.tolist()
        assert dictionary.string(item.target[:-1]) == rows[0]["tgt_text"]
        batch = dataset.collater([dataset[i] for i in range(len(rows))])
        assert batch["net_input"]["src_tokens"].shape[-1] == 80


def test_missing_espeak_is_a_one_line_error(tmp_path):
    env = {**ENV, "PATH": str(tmp_path)}  # no espeak-ng, no sox
    proc = run(PY, "-m", "experiments.speech.prepare_synthetic", "--out", tmp_path / "d", "--train", "2", env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "apt-get install espeak-ng sox" in proc.stderr, proc.stderr


def test_long_sentences_option():
    """--words MIN MAX: grammar sentences in that range (the long-utterance variant of the sweep);
    the default corpus is unchanged by the option's existence; bad ranges are argparse errors."""
    import random

    from experiments.speech import grammar
    from experiments.speech.prepare_synthetic import plan

    long = grammar.sentences(random.Random(0), 50, min_words=40, max_words=80)
    assert all(40 <= len(t.split()) <= 80 for t in long) and len(set(long)) == 50
    short = grammar.sentences(random.Random(0), 50)
    assert all(8 <= len(t.split()) <= 20 for t in short)
    sizes = {"train": 6, "valid": 2, "test": 2}
    assert plan(Path("/x"), "grammar", sizes, 5) == plan(Path("/x"), "grammar", sizes, 5, (8, 20))
    with pytest.raises(ValueError, match="min_words"):
        grammar.sentence(random.Random(0), 30, 20)
    for bad in (["--words", "2", "9"], ["--words", "30", "20"], ["--text", "movie", "--words", "40", "80"]):
        proc = run(PY, "-m", "experiments.speech.prepare_synthetic", "--out", "/nonexistent/x", *bad)
        assert proc.returncode == 2 and "--words" in proc.stderr.splitlines()[-1], proc.stderr


def test_sweep_trains_reports_and_decodes(corpus, tmp_path):
    """The real sweep file, shrunk: three attention arms, a few updates each, then report and evaluate."""
    overrides = [
        f"root={tmp_path / 'sweeps'}", f"data.path={corpus}", "data.prepare=null", "fairseq.encoder_layers=1",
        "fairseq.encoder_embed_dim=32", "fairseq.encoder_ffn_embed_dim=64", "fairseq.encoder_attention_heads=2",
        "fairseq.max_tokens=3000", "fairseq.validate_interval_updates=3", "fairseq.save_interval_updates=3",
        "fairseq.log_interval=1", "fairseq.warmup_updates=2", "model.clusters=8", "model.topk=8",
        "model.hash_bits=16", "model.cluster_iterations=3", "budget.wall_minutes=null", "budget.max_update=6",
        "resources.parallel=2",
    ]  # fmt: skip
    proc = run(PY, "-m", "slurm", "run", SWEEP, *overrides, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep_dir = tmp_path / "sweeps" / "speech"
    runs = ["softmax_ctc_s1", "clustered_ctc_s1", "i_clustered_ctc_s1"]
    for run_id in runs:
        result = json.loads((sweep_dir / run_id / "result.json").read_text())
        assert result["state"] == "finished" and result["updates"] == 6, result
        assert math.isfinite(result["final_metric"]) and result["final_metric"] >= 0  # valid CER (uer)
        assert "--criterion" in result["command"] and "speech_ctc" in result["command"]
        assert result["git_commit"]

    report = run(PY, "-m", "slurm", "report", SWEEP, *overrides)
    assert report.returncode == 0, report.stderr[-3000:]
    from PIL import Image

    for name in ("metric_vs_time.png", "learning_curves.png"):
        with Image.open(sweep_dir / "plots" / name) as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200

    evaluate = run(PY, "-m", "experiments.speech.evaluate", SWEEP, *overrides)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "speech_results.csv").open()))
    assert [r["run_id"] for r in rows] == runs
    assert {r["attention"] for r in rows} == {"softmax", "clustered", "i_clustered"}
    for row in rows:
        assert int(row["updates"]) == 6 and float(row["s_per_update"]) >= 0
        for key in ("valid_cer_best", "test_cer", "test_wer", "cards_cer", "cards_wer", "librivox_cer", "librivox_wer"):
            assert math.isfinite(float(row[key])) and float(row[key]) >= 0, (key, row)
        hypotheses = (sweep_dir / row["run_id"] / "decode" / "cards.txt").read_text()
        assert hypotheses.count("\nT-cards-") + hypotheses.startswith("T-cards-") == 5
        assert "T-cards-005\teight of spades four of clubs seven of hearts" in hypotheses
        assert hypotheses.count("H-test-") == 0
        assert (sweep_dir / row["run_id"] / "decode" / "test.txt").read_text().count("H-test-") == SIZES["test"]
    assert "| softmax_ctc_s1 | softmax |" in (sweep_dir / "speech_results.md").read_text()
    machine = json.loads((sweep_dir / "speech_results.json").read_text())["machine"]
    assert machine["cores"] >= 1 and machine["torch"] == torch.__version__


def test_librispeech_recipe(speech_deps, tmp_path):
    import soundfile

    from experiments.speech.fbank import fbank

    root = tmp_path / "LibriSpeech"
    lines = {"train-clean-100": ["ONE TWO THREE", "THE QUEEN OF HEARTS"], "dev-clean": ["SEVEN OF CLUBS"],
             "test-clean": ["HE WASN'T THERE"]}  # fmt: skip
    clips = {}
    for number, (subset, texts) in enumerate(lines.items()):
        chapter = root / subset / str(100 + number) / "7"
        chapter.mkdir(parents=True)
        with open(chapter / f"{100 + number}-7.trans.txt", "w") as handle:
            for i, text in enumerate(texts):
                utt = f"{100 + number}-7-{i:04d}"
                clips[utt] = synthesize(text.lower(), "en-us+m3")
                soundfile.write(chapter / f"{utt}.flac", clips[utt], 16000, subtype="PCM_16")
                handle.write(f"{utt} {text}\n")
    out = tmp_path / "libri"
    args = [PY, "-m", "experiments.speech.prepare_librispeech", "--root", root, "--out", out, "--jobs", "2"]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from experiments.speech.s2t_data import read_manifest

    test = read_manifest(out / "test.tsv")
    assert [(r["id"], r["tgt_text"]) for r in test] == [("102-7-0000", "h e | w a s n ' t | t h e r e")]
    assert len(read_manifest(out / "train.tsv")) == 2 and (out / "config.yaml").is_file()
    vocabulary = {line.split()[0] for line in (out / "dict.txt").read_text().splitlines()}
    assert vocabulary == set("".join(lines["train-clean-100"]).lower().replace(" ", "")) | {"|"}  # from train only
    feats = np.load(test[0]["audio"])
    expected = fbank(torch.from_numpy(clips["102-7-0000"].astype(np.float32))).numpy()
    assert np.abs(feats - expected).max() < 1e-5  # flac round trip is lossless: the same features
    again = run(*args)
    assert again.returncode == 0 and "up to date" in again.stderr

    shutil.rmtree(root / "dev-clean")
    wrong = run(PY, "-m", "experiments.speech.prepare_librispeech", "--root", root, "--out", tmp_path / "x")
    assert wrong.returncode != 0 and wrong.stderr.strip().count("\n") == 0, wrong.stderr
    assert f"no LibriSpeech subset at {root / 'dev-clean'}" in wrong.stderr and "expected" in wrong.stderr


def test_kaldi_data_directories(speech_deps, tmp_path):
    """WSJ/Switchboard arrive as Kaldi data dirs: wav.scp paths and pipes, segments, markup in text."""
    from experiments.speech.fbank import fbank
    from experiments.speech.s2t_data import read_manifest

    audio = synthesize("four of clubs and the king of spades", "en-us+f3")
    wav = tmp_path / "rec1.wav"
    subprocess.run(["sox", "-q", "-t", "raw", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", "-",
                    str(wav)], input=audio.tobytes(), check=True)  # fmt: skip
    dirs = {}
    for split in ("train", "valid", "test"):
        folder = dirs[split] = tmp_path / "kaldi" / split
        folder.mkdir(parents=True)
        (folder / "wav.scp").write_text(f"rec1 {wav}\nrec2 sox {wav} -t wav - |\n")
        (folder / "segments").write_text("u1 rec1 0.0 1.0\nu2 rec2 0.5 2.0\n")
        (folder / "text").write_text("u1 FOUR OF <NOISE> CLUBS\nu2 [laughter] THE KING\n")
        (folder / "utt2spk").write_text("u1 spkA\nu2 spkB\n")
    args = [PY, "-m", "experiments.speech.prepare_kaldi", "--out", tmp_path / "out",
            *(x for split, folder in dirs.items() for x in (f"--{split}", folder))]  # fmt: skip
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_manifest(tmp_path / "out" / "test.tsv")
    assert [(r["id"], r["speaker"], r["tgt_text"]) for r in rows] == [
        ("u1", "spkA", "f o u r | o f | c l u b s"), ("u2", "spkB", "t h e | k i n g")]
    expected = fbank(torch.from_numpy(audio[8000:32000].astype(np.float32))).numpy()  # 0.5 s .. 2.0 s, via the pipe
    assert np.abs(np.load(rows[1]["audio"]) - expected).max() < 1e-5
    assert run(*args).stderr.strip().endswith("up to date; nothing to do")
    (dirs["valid"] / "text").unlink()
    wrong = run(*[tmp_path / "other" if a == tmp_path / "out" else a for a in args])
    assert wrong.returncode != 0 and wrong.stderr.strip().count("\n") == 0
    assert f"{dirs['valid'] / 'text'} not found" in wrong.stderr
