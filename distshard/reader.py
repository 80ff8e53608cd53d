"""Read the bytes a rank owns into bucket buffers. No collectives here.

safetensors files are read with ``os.preadv`` straight into the bucket (tensors that are
adjacent in the file become one vectored read); ``.bin`` files go through
``torch.load(weights_only=True, mmap=True)`` and are copied from the mapping.

Where a node's ranks map the checkpoint files themselves (:func:`map_files`), a rank instead
brings its buckets into the page cache without copying them anywhere
(:meth:`ShardReader.populate`), and every rank's tensors are views of those pages.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable

import torch

from .byteviews import ByteViews
from .errors import DistShardError
from .index import safe_path
from .keymap import Conversion
from .plan import Bucket, LoadPlan, PlannedFile, Slot
from .routes.converted import read_converted

__all__ = ["ShardReader", "map_files"]

# Runs a conversion: (the conversion, checkpoint key -> tensor) -> model key -> tensor
Convert = Callable[[Conversion, dict[str, torch.Tensor]], dict[str, torch.Tensor]]

# Linux caps one preadv at IOV_MAX (1024) buffers.
_MAX_IOV = 1024
# madvise(MADV_POPULATE_READ), Linux 5.14: fault a range of a mapping in, reading what is not
# cached yet, without copying it anywhere. Older kernels answer EINVAL (then: read and drop).
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_SCRATCH = 4 << 20


class ShardReader:
    """Reads the buckets one rank owns, and the byte ranges of its own slices. Keeps one file
    open at a time (buckets of one file are consecutive in each owner's sequence)."""

    def __init__(self, root: str, plan: LoadPlan,
                 on_read: Callable[[int], None] | None = None,
                 convert: Convert | None = None) -> None:
        self.root = root
        self.plan = plan
        self.on_read = on_read  # told the bytes of each read as it completes (progress)
        self.convert = convert  # runs a conversion bucket's operation on its sources (see
        # distshard.routes.converted)
        self.bytes_read = 0
        self.files_read: list[str] = []
        self._name: str | None = None
        self._fd: int | None = None
        self._map: mmap.mmap | None = None  # read-only mapping of the open file (populate)
        self._scratch: memoryview | None = None  # where populate reads on kernels before 5.14
        self._state: dict[str, torch.Tensor] | None = None

    def clone(self) -> ShardReader:
        """Another reader of the same plan, with its own open file (one per thread)."""
        return ShardReader(self.root, self.plan, self.on_read, self.convert)

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
        if bucket.conversion is not None:
            read_converted(self, bucket, views)
            return
        with self._naming(bucket.file, bucket.slots[0].source_key):
            self._open(self.plan.file(bucket.file))
            if self._state is not None:
                self._copy_from_state(bucket, views)
            else:
                self._preadv(bucket, views)

    def read_source(self, src, out: torch.Tensor) -> None:
        """Fill ``out`` with the whole checkpoint tensor ``src`` (a :class:`SourceRead`)."""
        if src.begin is not None:  # safetensors: its byte range
            self.read_range(src.file, src.key, src.begin, out)
            return
        with self._naming(src.file, src.key):
            self._open(self.plan.file(src.file))
            held = self._state.get(src.key)
            if held is None or held.dtype != out.dtype or tuple(held.shape) != tuple(out.shape):
                raise DistShardError(f"file {src.file!r} no longer holds key {src.key!r} as "
                                     "planned", file=src.file, key=src.key)
            out.copy_(held)
            self._count(out.nbytes)

    def populate(self, bucket: Bucket) -> None:
        """Bring the bucket's bytes into the page cache, copying them nowhere: the node's ranks
        then map the file (:func:`map_files`) and find them there. safetensors only."""
        with self._naming(bucket.file, bucket.slots[0].source_key):
            self._open(self.plan.file(bucket.file))
            if self._map is None:
                self._map = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
            for begin, slots in _runs(bucket.slots):
                with self._naming(bucket.file, slots[0].source_key):
                    self._populate_run(begin, slots)

    def _populate_run(self, begin: int, slots: list[Slot]) -> None:
        nbytes = sum(s.nbytes for s in slots)
        start = begin - begin % mmap.PAGESIZE
        # read ahead from here on only: the bytes before are another rank's stretch
        self._map.madvise(mmap.MADV_SEQUENTIAL, start, begin + nbytes - start)
        try:
            self._map.madvise(_POPULATE_READ, start, begin + nbytes - start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._read_and_drop(begin, slots)
            return
        self._count(nbytes)

    def _read_and_drop(self, begin: int, slots: list[Slot]) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        end = begin + sum(s.nbytes for s in slots)
        for at in range(begin, end, _SCRATCH):
            n = min(_SCRATCH, end - at)
            self._read_exact(at, [self._scratch[:n]], self._name, slots)

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
        if self._map is not None:
            self._map.close()
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._map, self._state, self._name = None, None, None, None

    def _open(self, f: PlannedFile) -> None:
        if self._name == f.name:
            return
        self.close()
        path = safe_path(self.root, f.name)
        fd = _open_planned(self.root, f)
        # Reads are large and exact: kernel read-ahead (often megabytes) would only pull in
        # bytes past this rank's stretch, which another rank reads -- on another node, twice.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._fd, self._name = fd, f.name
        if f.name not in self.files_read:
            self.files_read.append(f.name)
        if f.kind == "bin":  # the file checked above, even if its name was given to another since
            opened = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path
            self._state = torch.load(opened, map_location="cpu", weights_only=True, mmap=True)

    def _preadv(self, bucket: Bucket, views: list[torch.Tensor]) -> None:
        dest = {id(slot): view for slot, view in zip(bucket.slots, views)}
        for begin, slots in _runs(bucket.slots):
            with self._naming(bucket.file, slots[0].source_key):
                self._read_exact(begin, [memoryview(dest[id(s)].numpy()) for s in slots],
                                 bucket.file, slots)

    def _read_exact(self, begin: int, views: list[memoryview], file: str,
                    key: str | list[Slot]) -> None:
        """Read ``views`` from byte ``begin`` on. ``key``: the tensor read, or the slots of the
        run (an early end names the tensor where the data stopped)."""
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
                if not isinstance(key, str):
                    key = next((s.source_key for s in key if s.begin + s.nbytes > begin + done),
                               key[-1].source_key)
                raise DistShardError(
                    f"file {file!r} ended early: wanted {want} bytes at offset {begin}, "
                    f"got {done}", file=file, key=key)
            done += n
        self._count(want)

    def _copy_from_state(self, bucket: Bucket, views: list[torch.Tensor]) -> None:
        for slot, dest in zip(bucket.slots, views):
            src = self._state.get(slot.source_key)
            numel = slot.nbytes // slot.dtype.itemsize
            if src is None or src.dtype != slot.dtype or src.numel() < slot.first + numel:
                raise DistShardError(
                    f"file {bucket.file!r} no longer holds key {slot.source_key!r} as planned",
                    file=bucket.file, key=slot.source_key)
            run = src.reshape(-1)[slot.first:slot.first + numel]
            dest.view(slot.dtype).view(slot.shape).copy_(run.view(slot.shape))
            self._count(slot.nbytes)

    def _count(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        if self.on_read is not None:
            self.on_read(nbytes)


def _runs(slots: tuple[Slot, ...]) -> list[tuple[int, list[Slot]]]:
    """The slots (safetensors, non-empty) grouped into runs adjacent in the file: one vectored
    read each, of at most :data:`_MAX_IOV` buffers."""
    runs: list[tuple[int, list[Slot]]] = []
    end = -1
    for slot in slots:
        if slot.nbytes == 0:
            continue
        if slot.begin == end and len(runs[-1][1]) < _MAX_IOV:
            runs[-1][1].append(slot)
        else:
            runs.append((slot.begin, [slot]))
        end = slot.begin + slot.nbytes
    return runs


def _open_planned(root: str, f: PlannedFile) -> int:
    """Open ``f`` for reading, refusing it if it is not the file that was planned."""
    fd = os.open(safe_path(root, f.name), os.O_RDONLY)
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
        os.close(fd)
        raise DistShardError(
            f"file {f.name!r} changed after it was planned (size {f.size} -> {st.st_size}, "
            f"mtime {f.mtime_ns} -> {st.st_mtime_ns}); do not rewrite a checkpoint while it "
            f"is being loaded", file=f.name)
    return fd


def map_files(root: str, plan: LoadPlan, buckets: list[Bucket]) -> dict[str, torch.Tensor]:
    """Every tensor of ``buckets`` (safetensors, in the checkpoint's dtype; each one run of one
    checkpoint tensor: the plan's ``identity``) on a storage of its own, a slice of a
    copy-on-write mapping of its file (see :class:`~distshard.byteviews.ByteViews`): the page
    cache's pages, shared by every process that maps the file, until this one writes a page
    (then that page is its own). The tensors keep their mapping alive. Rewriting the file in
    place (not by rename) while they live changes what they read, as with any mapped file."""
    whole: dict[str, Slot | list[Slot]] = {}  # key -> its slot, or its slots where several
    for bucket in buckets:
        for slot in bucket.slots:
            held = whole.get(slot.key)
            if held is None:
                whole[slot.key] = slot
            elif type(held) is list:
                held.append(slot)
            else:
                whole[slot.key] = [held, slot]
    mapped: dict[str, ByteViews] = {}  # each file's mapping
    out = {}
    for bucket in buckets:
        if bucket.file not in mapped:
            mapped[bucket.file] = ByteViews(_map_private(root, plan.file(bucket.file)))
        for slot in bucket.slots:
            if slot.key in out or any(slot.at):
                continue
            parts = whole[slot.key]  # its one slot, or runs of it from its first element on
            shape = slot.shape if type(parts) is not list else tuple(
                max(s.extent[0][d] + s.shape[d] for s in parts) for d in range(len(slot.shape)))
            out[slot.key] = mapped[bucket.file].at(slot.begin, slot.dtype, shape)
    return out


def _map_private(root: str, f: PlannedFile) -> torch.Tensor:
    try:
        fd = _open_planned(root, f)
        try:
            m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
    except OSError as e:
        raise DistShardError(f"mapping file {f.name!r} failed: {type(e).__name__}: {e}",
                             file=f.name) from e
    return torch.frombuffer(m, dtype=torch.uint8)
