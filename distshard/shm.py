"""A node's image of the replicated tensors in shared memory. No collectives here.

Ranks on one machine that all want the same tensors keep one copy of them per node, not one per
rank: a file in ``/dev/shm`` that every local rank maps. During the load each rank writes the
tensors it reads (or receives from another node) through a shared mapping; afterwards each rank
maps the file privately (copy-on-write) and its parameters become views of that mapping. Until a
rank writes a parameter, its pages are the node's one copy, as with a checkpoint file that every
rank maps (what transformers does); a write gives that rank its own copy of the page written.

The file is sized with ``ftruncate``, its pages allocated as ranks write them (in parallel, by
the readers), after a check that ``/dev/shm`` has room for it: a full ``/dev/shm`` (64 MB in a
default Docker container) is then an error before the load, which falls back to the backend.
(Reserving the space with ``posix_fallocate`` instead zeroes every page up front, in one thread,
while every rank waits: 0.1-0.3 s per GB here. What it would still catch is another process
filling ``/dev/shm`` during the load; that shows as a failed read, or as a SIGBUS if it happens
while converting dtypes.) Whether ranks that call themselves
one node really share the file is checked: each writes a nonce into its header entry and reads
every peer's back after a collective. The name is removed as soon as that check is done; the
mappings keep the memory alive, and the kernel frees it when the last of them goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os

import torch

__all__ = ["NodeImage", "SHM_DIR"]

SHM_DIR = "/dev/shm"
_HEADER = 4096  # one 8-byte entry per local rank; the data starts page-aligned after it
_ENTRY = 8
# madvise(MADV_POPULATE_WRITE), Linux 5.14: allocate a range's pages as a write would, writing
# nothing. Older kernels answer EINVAL.
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# madvise(MADV_DONTNEED) on a shared mapping of a file: drop the process's page-table entries of
# a range; the bytes stay in the file, and a later access maps them again.
_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
# Called through ctypes, which lets go of the GIL for the call (mmap.madvise holds it: the
# reader threads and the sends would wait while the pages of a bucket are allocated).
try:
    _madvise = ctypes.CDLL(None).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # no C library to call (the image's writes then allocate)
    _madvise = None


class NodeImage:
    """``nbytes`` of shared memory for one node's ranks, named by the load's ``token``."""

    def __init__(self, token: str, node: int, nbytes: int, local_ranks: int) -> None:
        if local_ranks * _ENTRY > _HEADER:
            raise ValueError(f"{local_ranks} ranks on one node is more than an image supports")
        self.path = os.path.join(SHM_DIR, f"distshard-{token}-node{node}")
        self.local_ranks = local_ranks
        self._size = _HEADER + nbytes
        room = os.statvfs(SHM_DIR)
        if room.f_bavail * room.f_frsize < self._size:
            raise OSError(errno.ENOSPC, f"{room.f_bavail * room.f_frsize / 1e6:.1f} MB free, "
                          f"{self._size / 1e6:.1f} MB needed")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
            self._mapping = mmap.mmap(self._fd, self._size, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._shared = torch.frombuffer(self._mapping, dtype=torch.uint8)
        except OSError:
            self.close()
            self.unlink()
            raise
        self.data = self._shared[_HEADER:]  # written by every local rank during the load

    def sign(self, local_index: int, nonce: int) -> None:
        self._entries()[local_index] = nonce

    def shared_by_all(self, nonce: int) -> bool:
        """Whether every local rank's entry holds ``nonce``: all of them mapped this very file."""
        return bool((self._entries()[:self.local_ranks] == nonce).all())

    def private(self) -> torch.Tensor:
        """A copy-on-write mapping of the data, once every local rank finished writing: its pages
        are the node's until this rank writes one. Closes the shared mapping and the file."""
        view = _map(self._fd, self._size, mmap.MAP_PRIVATE)[_HEADER:]
        self.close()
        return view

    def unlink(self) -> None:
        """Remove the name; the mappings live on until every rank has dropped them."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        self._shared = self.data = self._mapping = None  # (the views' buffers keep it open)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def prefault(self, begin: int, end: int) -> bool:
        """Allocate the pages of data bytes ``[begin, end)`` now, ahead of a write that would
        otherwise fault each one in as it copies (what a rank receiving into the image does
        while the disk keeps it waiting anyway). False where the kernel cannot (before Linux
        5.14, or no room): the write then allocates them, as without this."""
        return self._advise(begin, end, _POPULATE_WRITE)

    def forget(self, begin: int, end: int) -> bool:
        """Drop this process's page-table entries of data bytes ``[begin, end)`` in the shared
        mapping, once this rank has written (and sent) them: the bytes stay in the image. Done
        range by range while the disk paces the load; else closing the shared mapping tears
        them all down at once, after the last read (0.17 s per GB here)."""
        return self._advise(begin, end, _DONTNEED)

    def _advise(self, begin: int, end: int, advice: int) -> bool:
        """madvise ``advice`` over the pages of data bytes ``[begin, end)`` (the range cut at
        the image's end), without the GIL; False where it cannot."""
        start = _HEADER + begin
        start -= start % mmap.PAGESIZE  # (pages may be larger than the header: 64 KiB)
        length = min(_HEADER + end, self._size) - start
        if length <= 0:
            return True
        shared = self._shared  # (held through the call: the mapping stays while it runs)
        if _madvise is None or shared is None:
            return False
        return _madvise(shared.data_ptr() + start, length, advice) == 0

    def _entries(self) -> torch.Tensor:
        return self._shared[:_HEADER].view(torch.int64)


def _map(fd: int, size: int, flags: int) -> torch.Tensor:
    """The whole file as a uint8 tensor; the tensor keeps the mapping alive."""
    m = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(m, dtype=torch.uint8)
