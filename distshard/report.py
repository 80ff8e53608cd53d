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
    seconds_per_rank: list[float] = field(default_factory=list)  # each rank's own load time
    node_of_rank: list[int] = field(default_factory=list)  # nodes numbered by their lowest rank
    # Where a node's ranks share one copy of replicated tensors: "files" (the checkpoint files'
    # page cache, mapped copy-on-write), "shm" (an image in /dev/shm), None (each rank its own).
    shared_copy: str | None = None
    # model keys the checkpoint does not hold, initialised as the model initialises them (the
    # same values on every rank); also listed in missing_keys
    initialized_keys: list[str] = field(default_factory=list)
    # model keys made by an operation on whole checkpoint tensors (read by one rank)
    converted_keys: list[str] = field(default_factory=list)

    @property
    def bytes_read_per_node(self) -> list[int]:
        """Bytes each node read from storage (one node when ``node_of_rank`` is empty)."""
        nodes = self.node_of_rank or [0] * self.world_size
        out = [0] * (max(nodes) + 1)
        for node, n in zip(nodes, self.bytes_read_per_rank):
            out[node] += n
        return out

    def summary(self) -> str:
        """One line for a log: what was loaded, by how many ranks, how fast (naming the slowest
        rank), and the peak private host memory of each rank."""
        nodes = len(set(self.node_of_rank))
        where = f"{self.world_size} rank(s)" + (f" on {nodes} nodes" if nodes > 1 else "")
        head = (f"distshard: loaded {len(self.loaded_keys)} tensors, {_gb(self.total_bytes_read)} "
                f"read across {where} in {self.seconds:.2f} s")
        if self.seconds_per_rank:
            slowest = max(range(len(self.seconds_per_rank)), key=self.seconds_per_rank.__getitem__)
            head += (f"; slowest rank {slowest} ({self.seconds_per_rank[slowest]:.2f} s, "
                     f"read {_gb(self.bytes_read_per_rank[slowest])})")
        else:  # no per-rank times: name the rank that read the most
            slowest = max(range(self.world_size), key=lambda r: self.bytes_read_per_rank[r])
            head += f" (max {_gb(self.bytes_read_per_rank[slowest])} on rank {slowest})"
        new = f" ({len(self.initialized_keys)} initialized)" if self.initialized_keys else ""
        return (f"{head}; peak private host memory {self._memory_text()}; "
                f"{len(self.missing_keys)} missing{new}, {len(self.unexpected_keys)} unexpected keys")

    def _memory_text(self) -> str:
        per_rank = self.peak_host_memory_per_rank or [self.peak_host_memory]
        if len(per_rank) == 1:
            return _gb(per_rank[0])
        if len(per_rank) <= 8:
            return "per rank " + ", ".join(_gb(n) for n in per_rank)
        top = max(range(len(per_rank)), key=per_rank.__getitem__)
        low = min(range(len(per_rank)), key=per_rank.__getitem__)
        return (f"per rank from {_gb(per_rank[low])} (rank {low}) "
                f"to {_gb(per_rank[top])} (rank {top})")


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
