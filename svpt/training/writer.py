"""Run files written in the background, so that the GPU does not wait for the disk.

At the end of an epoch the host writes ``resume.pt`` (two fsyncs) and, at most once a minute,
``metrics.csv`` and ``curves.png``; with CUDA-graph steps the GPU would sit idle meanwhile
(~30 ms an epoch on the H200 host: 3 s of a 100-epoch VTAB-1k task). The run hands these writes
to one thread that does them in order while the next epoch trains; what it writes is a host
copy taken at the end of the epoch, so later steps cannot change it. A write that fails raises
in the run at its next hand-over or at ``flush()``, which the run calls before it reports a
result or stops; every file is still written atomically, so a crash leaves the previous one
(a run killed just after an epoch may therefore replay that epoch too). On a CPU, where the
host is the one training, the writes stay in the run's own thread (``threaded=False``).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class BackgroundWriter:
    def __init__(self, threaded: bool = True):
        # One thread: the files are written in the order they were handed over.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svpt-writer") if threaded else None
        self._pending: list[Future] = []

    def submit(self, write: Callable, *args) -> None:
        if self._pool is None:
            write(*args)
            return
        self._raise_failed()
        self._pending.append(self._pool.submit(write, *args))

    def _raise_failed(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()  # re-raises the write's exception here, in the run

    def flush(self) -> None:
        """Wait until every file handed over is written; raise the first failure."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
