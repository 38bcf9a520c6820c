"""Stop fairseq's batch-prefetch threads before the interpreter exits, so a finished run exits 0.

fairseq prefetches batches in a daemon thread (``fairseq.data.iterators.BackgroundConsumer``, behind
``BufferedIterator``, ``--data-buffer-size`` batches ahead). When training ends, that thread is often
collating the next epoch's batches inside a torch operator. CPython before 3.14 ends a daemon thread
that wakes up during interpreter finalization with ``pthread_exit``, whose forced unwinding through
torch's C++ frames calls ``std::terminate``: fairseq-train prints "terminate called without an active
exception" and dies of SIGABRT (exit status 134, -6 to a launcher) *after* it trained and saved its
checkpoints, so the sweep launcher records a finished run as failed.

:func:`install` registers an ``atexit`` callback (atexit callbacks run before finalization stops daemon
threads). It tells each live consumer to stop after its next batch (``_max_len``, which fairseq checks
after every batch it queues), empties its queue so that a blocked ``put`` returns, and joins it. At most
one batch is still collated; after :data:`STOP_SECONDS` it gives up and the exit proceeds as before.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time

__all__ = ["install", "stop_prefetch_threads"]

STOP_SECONDS = 30.0  # an upper bound on collating one batch; past it, exit as fairseq would


def stop_prefetch_threads(timeout: float = STOP_SECONDS) -> int:
    """Stop every live fairseq prefetch thread of this process within ``timeout`` seconds.

    Returns how many are still alive (0 unless a batch took longer than ``timeout``). A no-op
    without fairseq, or with a fairseq whose consumer lacks the attributes this relies on."""
    try:
        from fairseq.data.iterators import BackgroundConsumer
    except ImportError:
        return 0
    consumers = [
        t
        for t in threading.enumerate()
        if isinstance(t, BackgroundConsumer) and t.is_alive() and hasattr(t, "_max_len") and hasattr(t, "_queue")
    ]
    for thread in consumers:
        thread._max_len = 0  # fairseq breaks out once count >= _max_len, after its next put
    deadline = time.monotonic() + timeout
    for thread in consumers:
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                while True:  # make room: a put blocked on a full queue returns
                    thread._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(0.01)
    return sum(thread.is_alive() for thread in consumers)


def install() -> None:
    """Register :func:`stop_prefetch_threads` to run at interpreter exit (idempotent)."""
    atexit.unregister(stop_prefetch_threads)  # at most one registration however often fairseq imports us
    atexit.register(stop_prefetch_threads)
