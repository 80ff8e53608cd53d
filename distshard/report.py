"""What a load did: the report returned to the caller, and the host-memory sampler behind it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil

__all__ = ["LoadReport", "PeakMemorySampler"]


@dataclass(kw_only=True, slots=True)
class LoadReport:
    """Returned by :func:`distshard.load` on every rank. Byte counts are from storage."""

    rank: int
    world_size: int
    loaded_keys: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    files_read: list[str]
    bytes_read: int
    bytes_read_per_rank: list[int]
    total_bytes_read: int
    bytes_received: int  # from other ranks: whole buckets when replicated, own slices when sharded
    bytes_received_per_rank: list[int]
    seconds: float
    peak_host_memory: int
    peak_host_memory_per_rank: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log: what was loaded, by how many ranks, how fast, how much memory."""
        slowest = max(range(self.world_size), key=lambda r: self.bytes_read_per_rank[r])
        peak = max(self.peak_host_memory_per_rank or [self.peak_host_memory])
        return (
            f"distshard: loaded {len(self.loaded_keys)} tensors, {_gb(self.total_bytes_read)} "
            f"read once across {self.world_size} rank(s) in {self.seconds:.2f} s "
            f"(max {_gb(self.bytes_read_per_rank[slowest])} on rank {slowest}); "
            f"peak private host memory {_gb(peak)} per rank at most; "
            f"{len(self.missing_keys)} missing, {len(self.unexpected_keys)} unexpected keys")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


class PeakMemorySampler:
    """Peak private (anonymous) resident memory of this process while in the ``with`` block,
    above its value on entry. RSS minus shared pages is RssAnon: page-cache pages of mmapped
    checkpoint files are shared and so do not count, as they should not."""

    def __init__(self, interval: float = 0.005) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distshard-memory", daemon=True)
        self.baseline = self.peak = 0

    def _private(self) -> int:
        info = self._proc.memory_info()
        return info.rss - info.shared

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._private())

    def __enter__(self) -> PeakMemorySampler:
        self.baseline = self.peak = self._private()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._private())

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)
