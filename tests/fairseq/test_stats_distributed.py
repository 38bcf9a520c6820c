"""Attention statistics are averaged over the data-parallel workers, as fairseq's loss is.

The plugin side first, in process: every wrapped step carries every statistic, and reduce averages.
Then a real two-rank fairseq-train (CPU, gloo, one process per rank started here with
``--distributed-no-spawn``) on three one-line samples, one sample a batch: update 1 trains rank 0
on batch 0 and rank 1 on batch 1; update 2 trains rank 0 on batch 2 while rank 1, out of data,
runs fairseq's dummy batch, whose logging output the trainer zeroes. With ``--lr 0`` and no
dropout the model never changes and hardmax attention draws no random numbers, so a single-rank
run over the same three batches logs each batch's own value, one update each. The two-rank log
must then read mean(batch 0, batch 1) at update 1 and batch 2 alone at update 2: a per-process
statistic would read batch 0 at update 1, and an average that counted the dummy batch would not
read batch 2 at update 2.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from .data import preprocess, write_lines
from .runs import Run

REPO = Path(__file__).resolve().parents[2]
TRAIN = Path(sys.executable).parent / "fairseq-train"
STAT = "attn_hardmax_leaders"
# Three samples whose leader fractions differ (checked below, so that the test can fail).
LINES = [
    "the cat sat on the mat and then the dog ran under the big red log",
    "good good good good bad bad bad bad",
    "a small blue cat",
]
ROUNDING = 1e-3  # fairseq logs the statistic rounded to 3 decimals


def arguments(data: Path, save_dir: Path) -> List[str]:
    return [
        str(TRAIN), str(data), "--user-dir", str(REPO / "fairseq_plugin"), "--cpu", "--seed", "1",
        "--task", "masked_lm", "--criterion", "masked_lm", "--arch", "hardmax_transformer",
        "--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--max-positions", "32", "--tokens-per-sample", "32",
        "--sample-break-mode", "eos", "--dropout", "0", "--batch-size", "1", "--required-batch-size-multiple", "1",
        "--optimizer", "adam", "--lr", "0", "--lr-scheduler", "fixed", "--max-epoch", "1", "--disable-validation",
        "--no-save", "--num-workers", "0", "--no-progress-bar", "--log-format", "json", "--log-interval", "1",
        "--save-dir", str(save_dir),
    ]  # fmt: skip


class StubTask:
    """The three task methods fairseq's trainer calls; a 'model' is a callable that records."""

    def train_step(self, sample, model, *args, **kwargs):
        model()
        return 0.0, 1, {"loss": 1.0}

    valid_step = train_step

    def reduce_metrics(self, logging_outputs, criterion):
        pass


def test_every_step_carries_every_statistic_and_reduce_averages_them():
    """The keys of a step's logging output must agree on every rank (fairseq all-reduces one dict),
    whatever the attention type: all statistics, as plain numbers, zeros where unused."""
    from fairseq.logging import metrics

    from fairseq_plugin.modules import statistics

    task = StubTask()
    statistics.attach(task)
    statistics.attach(task)  # idempotent: a second model built by the same task wraps nothing twice
    steps = [
        task.train_step(None, lambda: [statistics.record("attn_topk_mass", torch.tensor(v)) for v in (0.2, 0.4)]),
        task.valid_step(None, lambda: statistics.record("attn_topk_mass", torch.tensor(0.9))),
        task.train_step(None, lambda: None),  # softmax: records nothing, still every key
    ]
    keys = {"loss"} | {f(n) for n in statistics.STATISTICS for f in (statistics.sum_key, statistics.count_key)}
    for _, _, out in steps:
        assert set(out) == keys and all(type(v) in (int, float) for v in out.values()), out
    assert steps[0][2][statistics.count_key("attn_topk_mass")] == 2
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics([out for _, _, out in steps], None)
        values = agg.get_smoothed_values()
    assert values == {"attn_topk_mass": pytest.approx((0.2 + 0.4 + 0.9) / 3, abs=1e-3)}  # the others: no value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finish(procs: List[subprocess.Popen], timeout: float) -> List[str]:
    """Wait for every process (killing them all by pid past the deadline); return their outputs."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def values(run: Run, tag: str) -> List[float]:
    key = STAT if tag == "train_inner" else f"{tag}_{STAT}"
    records = run.records(tag)
    assert records and all(key in r for r in records), run.output[-3000:]
    return [float(r[key]) for r in records]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stats-distributed")
    text = write_lines(root / "train.txt", LINES)
    return preprocess(root / "bin", text, text)


def test_attention_statistics_are_averaged_over_ranks(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # gloo on loopback only
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    init = f"tcp://127.0.0.1:{free_port()}"
    common = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    single = subprocess.Popen(arguments(data, tmp_path / "single"), **common)
    ranks = [
        subprocess.Popen(
            arguments(data, tmp_path / "pair") + [
                "--distributed-world-size", "2", "--distributed-rank", str(rank), "--distributed-backend", "gloo",
                "--distributed-init-method", init, "--distributed-no-spawn", "--ddp-backend", "legacy_ddp",
            ],
            **common,
        )  # fmt: skip
        for rank in range(2)
    ]
    single_out, *rank_outs = finish([single, *ranks], timeout=150)
    for proc, out in zip([single, *ranks], [single_out, *rank_outs]):
        assert proc.returncode == 0, out[-4000:]
    alone, pair = Run(tmp_path / "single", tmp_path, single_out), Run(tmp_path / "pair", tmp_path, rank_outs[0])

    per_batch = values(alone, "train_inner")  # batches 0, 1, 2 at updates 1, 2, 3
    assert len(per_batch) == 3, alone.output[-3000:]
    assert abs(per_batch[0] - per_batch[1]) > 10 * ROUNDING, per_batch  # the two ranks' values differ
    assert abs(per_batch[2] - (per_batch[0] + per_batch[1]) / 2) > 10 * ROUNDING, per_batch

    logged = values(pair, "train_inner")
    assert [int(r["num_updates"]) for r in pair.records("train_inner")] == [1, 2], pair.output[-3000:]
    assert logged[0] == pytest.approx((per_batch[0] + per_batch[1]) / 2, abs=ROUNDING), (logged, per_batch)
    assert logged[1] == pytest.approx(per_batch[2], abs=ROUNDING), (logged, per_batch)  # the dummy batch is not counted
    epoch = values(pair, "train")  # the epoch's value: every real batch of both ranks, once
    assert epoch == pytest.approx([sum(per_batch) / 3], abs=ROUNDING), (epoch, per_batch)
    assert values(alone, "train") == pytest.approx(epoch, abs=ROUNDING)
