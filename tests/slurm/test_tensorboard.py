"""TensorBoard for real: a tiny local sweep, then ``tensorboard --logdir <sweep>/tb`` on a free
loopback port, asked through its HTTP data API what a user's browser would show.

Endpoints (tensorboard 2.20): ``/data/runs`` (the run names, ``<run-id>/<split>``),
``/data/plugin/scalars/tags`` (``{run: {tag: {...}}}``) and ``/data/plugin/scalars/scalars?run=&tag=``
(``[[wall_time, step, value], ...]``). The server is stopped by its pid.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request

from .conftest import PY, run_cli, tiny_sweep

UPDATES = 4
# Every arm of the sweep and the statistics its attention logs (softmax: none).
ARMS = {
    "softmax_s1": set(),
    "i_clustered_s1": {"attn_cluster_size_cv", "attn_topk_mass"},
    "hardmax_s1": {"attn_hardmax_leaders"},
}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, route: str, **query: str):
    url = f"http://127.0.0.1:{port}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with OPENER.open(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for_runs(server: subprocess.Popen, port: int, expected: set, timeout: float) -> list:
    """Poll /data/runs until it lists every expected run (the first load is asynchronous)."""
    deadline, runs = time.time() + timeout, []
    while time.time() < deadline:
        if server.poll() is not None:
            output = server.communicate()[0]
            hint = ("\n(tensorboard < 2.21 imports pkg_resources, which setuptools >= 81 no longer ships: "
                    "tensorboard 2.21 does not)" if "pkg_resources" in output else "")  # fmt: skip
            raise AssertionError(f"tensorboard exited with {server.returncode}: {output[-3000:]}{hint}")
        try:
            runs = get(port, "/data/runs")
        except OSError:  # not listening yet
            runs = []
        if expected <= set(runs):
            return runs
        time.sleep(0.5)
    raise AssertionError(f"tensorboard listed {runs} after {timeout}s, expected {sorted(expected)}")


def test_tensorboard_serves_every_arm_with_loss_and_attention_statistics(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="tb", grid={"arch": ["softmax_transformer",
                      "i_clustered_transformer", "hardmax_transformer"]}, budget={"max_update": UPDATES})  # fmt: skip
    proc = run_cli(["run", str(path), "resources.parallel=2"], timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    logdir = tmp_path / "sweeps" / "tb" / "tb"
    assert sorted(p.name for p in logdir.iterdir()) == sorted(ARMS), list(logdir.iterdir())

    port = free_port()
    server = subprocess.Popen(
        [PY, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        expected = {f"{arm}/{split}" for arm in ARMS for split in ("train_inner", "valid")}
        runs = wait_for_runs(server, port, expected, timeout=60)
        assert {run.split("/")[0] for run in runs} == set(ARMS), runs  # every arm, nothing else
        tags = get(port, "/data/plugin/scalars/tags")
        for arm, stats in ARMS.items():
            inner = set(tags[f"{arm}/train_inner"])
            assert "loss" in inner and "loss" in tags[f"{arm}/valid"], (arm, sorted(inner))
            assert {t for t in inner if t.startswith("attn_")} == stats, (arm, sorted(inner))
            assert stats <= set(tags[f"{arm}/valid"]), (arm, sorted(tags[f"{arm}/valid"]))
            for tag in {"loss", *stats}:
                points = get(port, "/data/plugin/scalars/scalars", run=f"{arm}/train_inner", tag=tag)
                assert [step for _, step, _ in points] == list(range(2, UPDATES + 1, 2)), (arm, tag, points)
                assert all(math.isfinite(value) and value >= 0 for _, _, value in points), (arm, tag, points)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
