"""The options of :func:`distshard.load`, checked once (see its docstring for their meaning)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

__all__ = ["CROSSING_BUCKET_SIZE", "DEFAULT_BUCKET_SIZE", "DEFAULT_TIMEOUT", "LoadOptions"]

# Large enough that per-collective latency is amortised, small enough to stay a footnote
# next to the model itself.
DEFAULT_BUCKET_SIZE = 64 * 2**20
# The largest bucket of a load whose node images cross nodes: each node's owners read their
# buckets at the same time, and a bucket is sent to the other nodes only once it is read in
# full, so the last ones read are all sent after the disk is done; smaller buckets keep that
# tail short (see docs/benchmarks.md, "Replicated across nodes").
CROSSING_BUCKET_SIZE = 16 * 2**20
# How long a rank waits for another in one step. The longest wait of a healthy load is rank 0
# reading every header, or the slowest rank reading its whole share of row shards (17.5 GB of a
# 70B model at 100 MB/s is 3 minutes): ten minutes leaves room.
DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclass(kw_only=True, slots=True)
class LoadOptions:
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    strict: bool = True
    bucket_size: int = DEFAULT_BUCKET_SIZE
    read_own_slices: bool = True
    timeout: timedelta = DEFAULT_TIMEOUT
    log_summary: bool = True
    shared_memory: bool | None = None
    map_checkpoint: bool = True
    locality: str = "cluster"
    progress: bool | None = None
    key_mapping: dict[str, str] | None = None

    def bucket_size_for(self, num_nodes: int, node_image: bool) -> int:
        """The bucket size a load plans with: ``bucket_size``, capped at
        :data:`CROSSING_BUCKET_SIZE` where node images cross nodes (several nodes, cluster
        locality, and ``node_image``: the ranks of a node share one copy of the tensors)."""
        if num_nodes > 1 and self.locality == "cluster" and node_image:
            return min(self.bucket_size, CROSSING_BUCKET_SIZE)
        return self.bucket_size

    def __post_init__(self) -> None:
        if self.key_mapping is not None and not (isinstance(self.key_mapping, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.key_mapping.items())):
            raise ValueError("key_mapping must be a dict of regular expressions to replacements, "
                             f"got {self.key_mapping!r}")
        if self.locality not in ("cluster", "node"):
            raise ValueError(f"locality must be 'cluster' or 'node', got {self.locality!r}")
        if isinstance(self.timeout, (int, float)):
            self.timeout = timedelta(seconds=self.timeout)
        if not isinstance(self.timeout, timedelta) or self.timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be a positive timedelta or seconds, got {self.timeout!r}")
        if not isinstance(self.bucket_size, int) or self.bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive number of bytes, got {self.bucket_size!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype)
                                           and self.dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {self.dtype!r}")
        if self.device is not None:
            self.device = torch.device(self.device)
            if self.device.type == "meta":
                raise ValueError("device='meta' would load nothing; pass a real device")
