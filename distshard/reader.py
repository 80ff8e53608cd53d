"""Read the bytes a rank owns into bucket buffers. No collectives here.

safetensors files are read with ``os.preadv`` straight into the bucket (tensors that are
adjacent in the file become one vectored read); ``.bin`` files go through
``torch.load(weights_only=True, mmap=True)`` and are copied from the mapping.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from .errors import DistShardError
from .index import safe_path
from .plan import Bucket, LoadPlan, PlannedFile

__all__ = ["ShardReader"]

# Linux caps one preadv at IOV_MAX (1024) buffers.
_MAX_IOV = 1024


class ShardReader:
    """Reads the buckets one rank owns, and the byte ranges of its own slices. Keeps one file
    open at a time (buckets of one file are consecutive in each owner's sequence)."""

    def __init__(self, root: str, plan: LoadPlan,
                 on_read: Callable[[int], None] | None = None) -> None:
        self.root = root
        self.plan = plan
        self.on_read = on_read  # told the bytes of each read as it completes (progress)
        self.bytes_read = 0
        self.files_read: list[str] = []
        self._name: str | None = None
        self._fd: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def clone(self) -> ShardReader:
        """Another reader of the same plan, with its own open file (one per thread)."""
        return ShardReader(self.root, self.plan, self.on_read)

    def absorb(self, other: ShardReader) -> None:
        """Count what a clone read as this reader's."""
        self.bytes_read += other.bytes_read
        self.files_read += [f for f in other.files_read if f not in self.files_read]

    def read(self, bucket: Bucket, buf: torch.Tensor) -> None:
        """Fill ``buf`` (CPU, uint8, at least ``bucket.nbytes``) with the bucket's tensors, each
        at its slot's offset."""
        self.read_slots(bucket, [buf[s.offset:s.offset + s.nbytes] for s in bucket.slots])

    def read_slots(self, bucket: Bucket, views: list[torch.Tensor]) -> None:
        """Fill ``views[i]`` (CPU, uint8, contiguous, ``slots[i].nbytes``) with slot ``i``."""
        with self._naming(bucket.file, bucket.slots[0].key):
            self._open(self.plan.file(bucket.file))
            if self._state is not None:
                self._copy_from_state(bucket, views)
            else:
                self._preadv(bucket, views)

    def read_range(self, file: str, key: str, begin: int, out: torch.Tensor) -> None:
        """Fill contiguous CPU tensor ``out`` with its size in bytes from byte ``begin`` of
        safetensors file ``file`` (one rank reading its own slice of tensor ``key``)."""
        with self._naming(file, key):
            self._open(self.plan.file(file))
            self._read_exact(begin, [memoryview(out.reshape(-1).view(torch.uint8).numpy())], file, key)

    @contextlib.contextmanager
    def _naming(self, file: str, key: str):
        try:
            yield
        except DistShardError:
            raise
        except Exception as e:  # OSError and friends: say which file and tensor
            raise DistShardError(f"reading file {file!r} failed: {type(e).__name__}: {e}",
                                 file=file, key=key) from e

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._state, self._name = None, None, None

    def _open(self, f: PlannedFile) -> None:
        if self._name == f.name:
            return
        self.close()
        path = safe_path(self.root, f.name)
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            os.close(fd)
            raise DistShardError(
                f"file {f.name!r} changed after it was planned (size {f.size} -> {st.st_size}, "
                f"mtime {f.mtime_ns} -> {st.st_mtime_ns}); do not rewrite a checkpoint while it "
                f"is being loaded", file=f.name)
        # Reads are large and exact: kernel read-ahead (often megabytes) would only pull in
        # bytes past this rank's stretch, which another rank reads -- on another node, twice.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._fd, self._name = fd, f.name
        if f.name not in self.files_read:
            self.files_read.append(f.name)
        if f.kind == "bin":
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def _preadv(self, bucket: Bucket, views: list[torch.Tensor]) -> None:
        runs: list[tuple[int, list[memoryview]]] = []
        end = -1
        for slot, dest in zip(bucket.slots, views):
            if slot.nbytes == 0:
                continue
            view = memoryview(dest.numpy())
            if slot.begin == end and len(runs[-1][1]) < _MAX_IOV:
                runs[-1][1].append(view)
            else:
                runs.append((slot.begin, [view]))
            end = slot.begin + slot.nbytes
        for begin, views in runs:
            self._read_exact(begin, views, bucket.file, bucket.slots[0].key)

    def _read_exact(self, begin: int, views: list[memoryview], file: str, key: str) -> None:
        want = sum(len(v) for v in views)
        done = os.preadv(self._fd, views, begin)
        while done < want:  # short read: finish the run view by view
            skipped = done
            rest = []
            for v in views:
                if skipped >= len(v):
                    skipped -= len(v)
                    continue
                rest.append(v[skipped:])
                skipped = 0
            views = rest
            n = os.preadv(self._fd, views, begin + done)
            if n == 0:
                raise DistShardError(
                    f"file {file!r} ended early: wanted {want} bytes at offset {begin}, "
                    f"got {done}", file=file, key=key)
            done += n
        self._count(want)

    def _copy_from_state(self, bucket: Bucket, views: list[torch.Tensor]) -> None:
        for slot, dest in zip(bucket.slots, views):
            src = self._state.get(slot.key)
            if src is None or src.dtype != slot.dtype or tuple(src.shape[1:]) != slot.shape[1:]:
                raise DistShardError(
                    f"file {bucket.file!r} no longer holds key {slot.key!r} as planned",
                    file=bucket.file, key=slot.key)
            if slot.shape:
                src = src[slot.row:slot.row + slot.shape[0]]
            dest.view(slot.dtype).view(slot.shape).copy_(src)
            self._count(slot.nbytes)

    def _count(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        if self.on_read is not None:
            self.on_read(nbytes)
