"""One progress bar for the whole job during a load: bytes of all ranks, GB/s and ETA, drawn by
rank 0 on its terminal; the other ranks only count.

Every rank counts the bytes it moves (:meth:`JobProgress.advance`, cheap, from any thread) and
adds them to one counter in the process group's store (``store.add(key, n)``) from a single
flusher thread, every :attr:`JobProgress.push_interval` seconds at most and only when it has
something to add. Rank 0 reads the counter a few times a second (an ``add`` of 0 returns the
total) and logs one line on the ``distshard.progress`` logger; :class:`ProgressHandler` redraws
that line in place with ``"\\r"``.

Store objects and threads: TCPStore and FileStore serialise their operations behind a mutex,
so the flusher may share the group's store with the main thread; within one
:class:`JobProgress`, every store call is made under one lock, so ``flush``/``close`` never race
the flusher.

Turning it off: ``enabled=False`` (no thread, no store traffic, nothing drawn), or
``DISTSHARD_PROGRESS=0`` in the environment when ``enabled`` is left at None. To send the
lines elsewhere, add your own handler to ``logging.getLogger("distshard.progress")`` before the
load (and give that logger a level of INFO or below); the default handler is installed only
on a logger that has none, and it then keeps these records from the root logger, whose
handlers would write each redraw as a line of its own.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["JobProgress", "ProgressHandler", "progress_wanted"]

logger = logging.getLogger("distshard.progress")
_log = logging.getLogger("distshard")
ENV = "DISTSHARD_PROGRESS"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


def progress_wanted(rank: int) -> bool:
    """The ``enabled=None`` rule for drawing: rank 0, ``sys.stderr`` a terminal, and not
    ``DISTSHARD_PROGRESS=0``."""
    return rank == 0 and os.environ.get(ENV, "").strip() != "0" and _isatty(sys.stderr)


class JobProgress:
    """Progress of one load across the job; one instance per rank, ``key`` naming the load.

    ``enabled``: None draws on rank 0 when :func:`progress_wanted` says so, and has the other
    ranks count unless ``DISTSHARD_PROGRESS=0``; True draws on rank 0 even without a terminal;
    False does nothing. Other ranks never draw. Without ``store`` (one process) the count is
    this rank's own.

    Order for an exact final line: every rank calls :meth:`flush` after its last
    :meth:`advance` and before the load's last collective; rank 0 calls :meth:`close` after it.
    """

    poll_interval = 0.25  # seconds between rank 0's redraws
    push_interval = 0.5  # seconds between another rank's adds to the store, at most
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, total_bytes: int, *, rank: int, key: str, store: Any = None,
                 enabled: bool | None = None) -> None:
        self.total_bytes = max(0, int(total_bytes))
        self.rank = rank
        self.key = f"distshard/progress/{key}"
        self.drawing = rank == 0 and (progress_wanted(rank) if enabled is None else enabled)
        env_off = enabled is None and os.environ.get(ENV, "").strip() == "0"
        self._store = store if (rank != 0 or self.drawing) else None
        self.counting = self.drawing or (rank != 0 and store is not None and
                                         enabled is not False and not env_off)
        self._lock = threading.Lock()  # advance()'s counters
        self._store_lock = threading.Lock()  # one store call at a time from this object
        self._pending = 0  # advanced, not yet added to the store
        self._local = 0  # everything this rank advanced
        self._job = 0  # the job's count as rank 0 last saw it
        self._closed = False
        self._started = self.clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.counting:
            if self.drawing:
                _install_default_handler()
            self._thread = threading.Thread(target=self._run, name="distshard-progress",
                                            daemon=True)
            self._thread.start()

    # --- any rank, any thread ---------------------------------------------------------------

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more moved by this rank."""
        if self.counting:
            with self._lock:
                self._pending += nbytes
                self._local += nbytes

    @property
    def done_bytes(self) -> int:
        """Rank 0: the job's bytes as last read from the store (its own, without a store).
        Other ranks: their own."""
        return self._job if self.rank == 0 else self._local

    def flush(self) -> None:
        """Add this rank's pending bytes to the store now (rank 0: and read the total)."""
        if self.counting:
            self._sync(wait=True)

    def close(self) -> None:
        """Stop the flusher, flush, and on rank 0 draw the final line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.counting:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # a store that stopped answering must not hold a load
        self._sync(wait=False)
        if self.drawing:
            self._draw(final=True)

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the flusher thread -----------------------------------------------------------------

    def _run(self) -> None:
        interval = self.poll_interval if self.drawing else self.push_interval
        while not self._stop.wait(interval):
            self._sync(wait=True)
            if self.drawing and not self._stop.is_set():
                self._draw(final=False)

    def _sync(self, *, wait: bool) -> None:
        with self._lock:
            pending, self._pending = self._pending, 0
        if self._store is None:
            self._job += pending if self.rank == 0 else 0
            return
        if pending == 0 and self.rank != 0:
            return
        if not self._store_lock.acquire(timeout=-1 if wait else 1.0):
            with self._lock:  # the flusher is stuck in the store: keep the bytes for later
                self._pending += pending
            return
        try:
            value = self._store.add(self.key, pending)
        except Exception as e:  # progress must never fail a load
            _log.debug("distshard: progress counter unavailable on rank %d: %s", self.rank, e)
            self._store = None  # rank 0 counts on from the last total it read
            self._job += pending if self.rank == 0 else 0
            return
        finally:
            self._store_lock.release()
        if self.rank == 0:
            self._job = int(value)

    def _draw(self, *, final: bool) -> None:
        logger.info(self.line(self.done_bytes, self.clock() - self._started, final=final),
                    extra={"distshard_progress": "final" if final else "update"})

    def line(self, done: int, elapsed: float, *, final: bool = False) -> str:
        """The bar's text for ``done`` bytes after ``elapsed`` seconds.

        >>> JobProgress(4 * 10**9, rank=1, key="doc", enabled=False).line(10**9, 2.0)
        'distshard: 1.00 GB / 4.00 GB (25%) | 0.50 GB/s | ETA 0:06'
        """
        rate = done / elapsed if elapsed > 0 else 0.0
        percent = 100 * done // self.total_bytes if self.total_bytes else 100
        if final:
            tail = f"done in {elapsed:.1f} s"
        elif rate > 0:
            tail = f"ETA {_clock_text(max(0, self.total_bytes - done) / rate)}"
        else:
            tail = "ETA --:--"
        return (f"distshard: {_size(done)} / {_size(self.total_bytes)} ({percent:.0f}%) | "
                f"{rate / 1e9:.2f} GB/s | {tail}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _clock_text(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressHandler(logging.Handler):
    """Draws ``distshard.progress`` records: on a terminal each update replaces the line
    before it (``"\\r"``, padded over the old text) and the final record ends the line; on any
    other stream, updates are written one per line at most every ``plain_interval`` seconds.
    Other records pass through, one per line. ``stream=None`` means ``sys.stderr`` at the time
    of writing."""

    plain_interval = 10.0

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._width = 0  # characters on the open line, 0 when none is open
        self._last_plain = float("-inf")

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = self.stream
            if getattr(record, "distshard_progress", None) == "update":
                if _isatty(stream):
                    stream.write("\r" + text + " " * max(0, self._width - len(text)))
                    self._width = len(text)
                elif time.monotonic() - self._last_plain >= self.plain_interval:
                    self._last_plain = time.monotonic()
                    stream.write(text + "\n")
            else:
                pad = " " * max(0, self._width - len(text))
                stream.write(("\r" if self._width else "") + text + pad + "\n")
                self._width = 0
            stream.flush()
        except Exception:
            self.handleError(record)


_install_lock = threading.Lock()


def _install_default_handler() -> None:
    """Give ``distshard.progress`` a :class:`ProgressHandler` unless it has a handler already;
    its records then stay off the root logger, whose handlers would print each redraw as a
    line of its own."""
    with _install_lock:
        if logger.handlers:
            return
        logger.addHandler(ProgressHandler())
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
