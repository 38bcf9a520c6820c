"""Where the ranks of a multi-task job meet: a port that no other job on the host can hold.

Rank 0 asks the kernel for a free port (``bind`` to port 0) and keeps that socket for the rest
of its life, so the kernel gives the port to no other ``bind(0)`` or outgoing connection on the
host, whichever job asks. The socket has ``SO_REUSEADDR`` set after the bind and never listens:
fairseq's TCP store (``SO_REUSEADDR``, as every c10d and libuv listener sets it) may then bind and
listen on the same port, and nothing else can. Rank 0 publishes ``master:port`` in a small file
in the run's folder (a filesystem every node shares, as submitit requires anyway); the other
ranks wait for that file. A hash of the job id could not promise this: two jobs on one node
collide whenever their hashes do.

The file is named after the job id and the attempt (``SLURM_RESTART_COUNT``), so that a requeued
job never reads the port of its previous attempt; rank 0 removes older files of the same run
when it publishes, and its own file when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

WAIT_S = 300.0  # how long the other ranks wait for rank 0 (a busy node, an NFS attribute cache)
_HELD: list[socket.socket] = []  # rank 0's reservations: held until the process ends


class RendezvousError(RuntimeError):
    """Rank 0's file did not appear in time (or could not be read)."""


def reserve_port() -> tuple[socket.socket, int]:
    """A port that stays this process's while the returned socket is open; a store may bind it too."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", 0))  # without SO_REUSEADDR: the kernel picks a port no other socket holds
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # now a listener with SO_REUSEADDR may share it
    return sock, int(sock.getsockname()[1])


def rendezvous_file(folder: Path, job_id: str, attempt: str) -> Path:
    return folder / f".rendezvous-{job_id}-{attempt}.json"


def _attempt() -> str:
    return os.environ.get("SLURM_RESTART_COUNT", "0")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def publish(folder: Path, job_id: str, master: str, attempt: str | None = None) -> int:
    """Rank 0: reserve a port, write ``master:port`` for the other ranks, return the port."""
    attempt = _attempt() if attempt is None else attempt
    sock, port = reserve_port()
    _HELD.append(sock)
    path = rendezvous_file(folder, job_id, attempt)
    for old in folder.glob(".rendezvous-*.json"):  # earlier attempts' files: nobody reads them any more
        if old != path:
            _remove(old)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"job_id": job_id, "attempt": attempt, "master": master, "port": port,
                               "host": socket.gethostname(), "pid": os.getpid()}))  # fmt: skip
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    atexit.register(_remove, path)
    return port


def wait_for(folder: Path, job_id: str, rank: int, attempt: str | None = None,
             timeout_s: float = WAIT_S) -> tuple[str, int]:  # fmt: skip
    """The other ranks: ``(master, port)`` from rank 0's file, or a one-line error after ``timeout_s``."""
    attempt = _attempt() if attempt is None else attempt
    path = rendezvous_file(folder, job_id, attempt)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            data = json.loads(path.read_text())
            return str(data["master"]), int(data["port"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError) as error:
            raise RendezvousError(f"rank {rank} of job {job_id}: unreadable rendezvous file {path}: {error}") from None
        if time.monotonic() > deadline:
            raise RendezvousError(
                f"rank {rank} of job {job_id}: rank 0 wrote no rendezvous file {path} within {timeout_s:.0f}s; "
                f"is rank 0 running, and is {folder} on a filesystem that every node shares?"
            )
        time.sleep(0.2)


def endpoint(folder: Path, job_id: str, rank: int, master: str, attempt: str | None = None,
             timeout_s: float = WAIT_S) -> tuple[str, int]:  # fmt: skip
    """``(master, port)`` for fairseq's ``--distributed-init-method tcp://master:port``, the same on
    every rank of one attempt of job ``job_id``. ``master`` is rank 0's address (its host name, or
    127.0.0.1 on one node); only rank 0's value is used."""
    if rank == 0:
        return master, publish(folder, job_id, master, attempt)
    return wait_for(folder, job_id, rank, attempt, timeout_s)
