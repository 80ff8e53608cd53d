"""What the benchmarks share: the sample checkpoint and cold-cache eviction."""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch_examples"))

from common import SIZES, write_sample  # noqa: E402

__all__ = ["SIZES", "evict", "sample_checkpoint"]


def sample_checkpoint(path: str | None, size: str) -> str:
    """``path``, or a sample Llama-like checkpoint of ``size`` (written once, in 200 MB shards)."""
    if path:
        return path
    path = os.path.join(tempfile.gettempdir(), f"distshard-sample-llama-{size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"writing a sample {size} checkpoint to {path} ...", flush=True)
        write_sample(path + ".partial", size, max_shard_size="200MB")
        os.replace(path + ".partial", path)
    return path


def evict(folder: str) -> None:
    """Drop the checkpoint's pages from the page cache (no root needed; dirty pages of a freshly
    written file are synced first, or they would stay)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
