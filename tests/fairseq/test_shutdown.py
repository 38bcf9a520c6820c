"""fairseq's batch-prefetch thread is stopped at exit, so a process that used it exits 0, not SIGABRT."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# fairseq's own BufferedIterator over batches that cost about a millisecond of torch work each (as a
# collater's stack and pad do): the prefetch thread is inside a torch operator most of the time.
PREFETCH = textwrap.dedent(
    """
    import torch
    import fairseq
    from fairseq.data.iterators import BufferedIterator
    import fairseq_plugin  # registers itself: fairseq is already imported

    class Batches:
        def __len__(self):
            return 10**9

        def __iter__(self):
            rows = torch.randn(64, 256)
            while True:
                yield torch.stack([rows] * 64).sum(0)

    it = BufferedIterator(1000, Batches())
    first = [next(it) for _ in range(3)]
    """
)


def test_process_with_a_busy_prefetch_thread_exits_cleanly():
    # Without the plugin's exit hook this process dies of SIGABRT ("terminate called without an
    # active exception", exit status -6) on CPython < 3.14: the daemon thread is ended by
    # pthread_exit inside a torch operator while the interpreter finalizes.
    # (One run: without the hook it aborted in every run tried here.)
    proc = subprocess.run([sys.executable, "-c", PREFETCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "terminate called" not in proc.stderr


def test_stop_prefetch_threads_stops_a_consumer_blocked_on_a_full_queue():
    from fairseq.data.iterators import BackgroundConsumer, BufferedIterator

    from fairseq_plugin.shutdown import stop_prefetch_threads

    it = BufferedIterator(2, list(range(1000)))
    assert next(it) == 0
    consumer = it._consumer
    assert isinstance(consumer, BackgroundConsumer) and consumer.is_alive()
    assert stop_prefetch_threads(timeout=30) == 0
    assert not consumer.is_alive()
    assert stop_prefetch_threads(timeout=30) == 0  # nothing left: a no-op
