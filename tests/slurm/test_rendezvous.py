"""The rendezvous port (slurm/rendezvous.py): no two jobs on one host can be given the same one.

No SLURM here: the kernel's port bookkeeping is what is tested, with real sockets and real
processes; the two-node cluster runs it across hosts in test_multinode.py.
"""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import zlib

import pytest
import torch.distributed as dist

from slurm import rendezvous

from .conftest import PY, REPO

# Two SLURM job ids whose crc32 (mod 20000) is the same: the old port choice gave both one port.
SAME_CRC = ("241", "276")

HOLDER = """
import sys
from pathlib import Path
from slurm import rendezvous
print(rendezvous.publish(Path(sys.argv[1]), sys.argv[2], "127.0.0.1", attempt="0"), flush=True)
sys.stdin.read()  # hold the port until the test closes stdin
"""


def test_old_hash_collides_for_these_job_ids():
    assert len({20000 + zlib.crc32(i.encode()) % 20000 for i in SAME_CRC}) == 1


def test_concurrent_jobs_on_one_host_get_different_ports(tmp_path):
    holders = []
    try:
        for i, job_id in enumerate(SAME_CRC * 3):  # six rank-0 processes at once, in six run folders
            folder = tmp_path / f"run{i}"
            folder.mkdir()
            holders.append(subprocess.Popen([PY, "-c", HOLDER, str(folder), job_id], cwd=REPO, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE))  # fmt: skip
        ports = [int(h.stdout.readline()) for h in holders]
        assert len(set(ports)) == len(ports), ports
        # While held, nobody else may bind the port ...
        probe = socket.socket()
        with pytest.raises(OSError):
            probe.bind(("", ports[0]))
        probe.close()
        # ... and what each rank 1 reads is its own job's port.
        for i, job_id in enumerate(SAME_CRC * 3):
            assert rendezvous.wait_for(tmp_path / f"run{i}", job_id, rank=1, attempt="0", timeout_s=5) == ("127.0.0.1", ports[i])
    finally:
        for h in holders:
            h.stdin.close()
            h.wait(timeout=30)
    # Each holder removed its file when it exited.
    assert list(tmp_path.rglob(".rendezvous-*")) == []


def test_the_training_store_can_bind_the_held_port(tmp_path):
    # fairseq's --distributed-init-method tcp://master:port ends in a c10d TCPStore on rank 0.
    master, port = rendezvous.endpoint(tmp_path, "7", rank=0, master="127.0.0.1", attempt="0")
    store = dist.TCPStore(master, port, 2, True, timeout=datetime.timedelta(seconds=20), wait_for_workers=False)
    client = dist.TCPStore(*rendezvous.endpoint(tmp_path, "7", rank=1, master="ignored", attempt="0", timeout_s=5), 2,
                           False, timeout=datetime.timedelta(seconds=20))  # fmt: skip
    store.set("from", "rank0")
    assert client.get("from") == b"rank0"
    assert json.loads(rendezvous.rendezvous_file(tmp_path, "7", "0").read_text())["port"] == port


def test_a_requeued_attempt_never_reads_the_previous_port(tmp_path):
    rendezvous.publish(tmp_path, "9", "node1", attempt="0")
    with pytest.raises(rendezvous.RendezvousError) as error:
        rendezvous.wait_for(tmp_path, "9", rank=1, attempt="1", timeout_s=0.5)
    message = str(error.value)
    assert "\n" not in message and "rank 1 of job 9" in message and "every node shares" in message
    port = rendezvous.publish(tmp_path, "9", "node1", attempt="1")
    assert [p.name for p in tmp_path.iterdir()] == [".rendezvous-9-1.json"]  # the stale one is gone
    assert rendezvous.wait_for(tmp_path, "9", rank=1, attempt="1", timeout_s=5) == ("node1", port)
