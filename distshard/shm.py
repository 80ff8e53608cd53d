"""A shared-memory staging window for the ranks of one node. No collectives here.

Ranks on one machine exchange replicated buckets through a file in ``/dev/shm`` that they all map:
the bucket's reader writes it once, every local rank copies it into its own parameters. Over gloo
the alternative is a broadcast through loopback TCP, which moves every byte through the kernel
once per receiving rank (measured in benchmarks/compare.py).

The window is two halves (double buffering: one is read into while the other is copied out), each
large enough for one bucket per local rank. Its space is reserved with ``posix_fallocate`` so that
a full ``/dev/shm`` (64 MB in a default Docker container) is an error now, not a SIGBUS later.
Whether ranks that call themselves one node really share the file is checked: each writes a nonce
into its header entry and reads every peer's back after a collective.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["NodeWindow", "SHM_DIR"]

SHM_DIR = "/dev/shm"
_HEADER = 4096  # one 8-byte entry per local rank; the data starts page-aligned after it
_ENTRY = 8


class NodeWindow:
    def __init__(self, token: str, node: int, half_bytes: int, local_ranks: int) -> None:
        if local_ranks * _ENTRY > _HEADER:
            raise ValueError(f"{local_ranks} ranks on one node is more than a window supports")
        self.path = os.path.join(SHM_DIR, f"distshard-{token}-node{node}")
        self.half_bytes = half_bytes
        self.local_ranks = local_ranks
        size = _HEADER + 2 * half_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)
        self._data = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)

    def sign(self, local_index: int, nonce: int) -> None:
        self._entries()[local_index] = nonce

    def shared_by_all(self, nonce: int) -> bool:
        """Whether every local rank's entry holds ``nonce``: all of them mapped this very file."""
        return bool((self._entries()[:self.local_ranks] == nonce).all())

    def area(self, half: int, offset: int, nbytes: int) -> torch.Tensor:
        start = _HEADER + half * self.half_bytes + offset
        return self._data[start:start + nbytes]

    def unlink(self) -> None:
        """Remove the name; the mapping lives on until every rank has dropped it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _entries(self) -> torch.Tensor:
        return self._data[:_HEADER].view(torch.int64)
