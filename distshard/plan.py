"""Who reads what, and in which order tensors are distributed: a frozen, picklable plan.

Pure: no files, no torch.distributed. Rank 0 builds the plan and broadcasts it; every rank then
walks ``plan.buckets`` in the same order, which is what keeps the collectives matched.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .index import FileInfo, TensorInfo

__all__ = [
    "ALIGN",
    "Box",
    "Bucket",
    "LoadPlan",
    "Piece",
    "PlannedFile",
    "Slot",
    "assign_files",
    "intersect",
    "make_plan",
    "payload_layout",
]

# The part of a tensor one rank keeps: (global offset, local shape) per dimension. A plain tensor's
# box is the whole tensor; a DTensor's is its local shard (``compute_local_shape_and_global_offset``).
Box = tuple[tuple[int, ...], tuple[int, ...]]

# Every slot of a bucket starts at a multiple of ALIGN bytes, so that a uint8 bucket can be
# viewed as any dtype in place.
ALIGN = 16


@dataclass(frozen=True, slots=True)
class Slot:
    """Rows ``row .. row + shape[0]`` of tensor ``key`` (all of it when ``row == 0`` and
    ``shape`` is the tensor's) inside a bucket: ``nbytes`` bytes at ``offset`` in the bucket,
    read from byte ``begin`` of the file (``None`` for ``.bin`` files, read by key)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int | None
    offset: int
    nbytes: int
    row: int = 0

    @property
    def extent(self) -> Box:
        """The part of the whole tensor this slot holds, as a box."""
        offset = ((self.row,) + (0,) * (len(self.shape) - 1)) if self.shape else ()
        return offset, self.shape


@dataclass(frozen=True, slots=True)
class Bucket:
    """A flat byte buffer that ``owner`` fills from ``file`` and broadcasts to every rank."""

    owner: int
    file: str
    nbytes: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class PlannedFile:
    name: str
    kind: str
    size: int
    mtime_ns: int
    owner: int
    nbytes: int  # bytes of this file that will be read (the tensors the model needs)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    world_size: int
    bucket_size: int
    files: tuple[PlannedFile, ...]
    buckets: tuple[Bucket, ...]

    def bytes_per_rank(self) -> list[int]:
        loads = [0] * self.world_size
        for f in self.files:
            loads[f.owner] += f.nbytes
        return loads

    def file(self, name: str) -> PlannedFile:
        return next(f for f in self.files if f.name == name)


def assign_files(nbytes: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Give each file to a rank, largest file first, to the least-loaded rank (lowest rank on
    ties). Deterministic; the heaviest rank carries at most ``total / world_size + max(file)``.

    >>> assign_files({"a": 5, "b": 3, "c": 3}, 2)
    {'a': 0, 'b': 1, 'c': 1}
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    loads = [(0, rank) for rank in range(world_size)]
    owner = {}
    for name in sorted(nbytes, key=lambda n: (-nbytes[n], n)):
        load, rank = heapq.heappop(loads)
        owner[name] = rank
        heapq.heappush(loads, (load + nbytes[name], rank))
    return dict(sorted(owner.items()))


def make_plan(files: Sequence[FileInfo], world_size: int, bucket_size: int) -> LoadPlan:
    """Plan the load of the tensors listed in ``files`` (only those the model needs).

    Buckets never mix files and keep a file's tensors in file order, so one bucket is one
    near-sequential read; a tensor larger than ``bucket_size`` is cut into runs of whole rows
    (contiguous bytes) that fill one bucket each, so staging never exceeds ``bucket_size``
    unless a single row does. Buckets of different owners are interleaved so that reads spread
    over ranks.
    """
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be positive, got {bucket_size}")
    needed = {f.name: sum(t.nbytes for t in f.tensors.values()) for f in files}
    owner = assign_files(needed, world_size)
    planned = tuple(
        PlannedFile(f.name, f.kind, f.size, f.mtime_ns, owner[f.name], needed[f.name])
        for f in sorted(files, key=lambda f: f.name))
    per_owner: list[list[Bucket]] = [[] for _ in range(world_size)]
    for f in sorted(files, key=lambda f: f.name):
        per_owner[owner[f.name]].extend(_pack(f, owner[f.name], bucket_size))
    return LoadPlan(world_size, bucket_size, planned, _interleave(per_owner))


def _pack(f: FileInfo, owner: int, bucket_size: int) -> list[Bucket]:
    order = sorted(f.tensors.items(), key=lambda kv: (kv[1].begin or 0, kv[0]))
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    end = 0
    for key, t in order:
        if t.nbytes > bucket_size and len(t.shape) >= 1 and t.shape[0] > 1:
            if slots:  # keep file order: close the open bucket first
                buckets.append(Bucket(owner, f.name, end, tuple(slots)))
                slots, end = [], 0
            buckets.extend(Bucket(owner, f.name, s.nbytes, (s,)) for s in _row_runs(key, t, bucket_size))
            continue
        offset = _align(end)
        if slots and offset + t.nbytes > bucket_size:
            buckets.append(Bucket(owner, f.name, end, tuple(slots)))
            slots, offset = [], 0
        slots.append(Slot(key, t.dtype, t.shape, t.begin, offset, t.nbytes))
        end = offset + t.nbytes
    if slots:
        buckets.append(Bucket(owner, f.name, end, tuple(slots)))
    return buckets


def _row_runs(key: str, t: TensorInfo, bucket_size: int) -> list[Slot]:
    row_bytes = t.nbytes // t.shape[0]
    step = max(1, bucket_size // row_bytes)
    runs = []
    for row in range(0, t.shape[0], step):
        n = min(step, t.shape[0] - row)
        begin = None if t.begin is None else t.begin + row * row_bytes
        runs.append(Slot(key, t.dtype, (n, *t.shape[1:]), begin, 0, n * row_bytes, row))
    return runs


@dataclass(frozen=True, slots=True)
class Piece:
    """The part ``box`` (in whole-tensor coordinates) of ``slot`` that one rank receives, at
    ``offset`` of its payload."""

    slot: Slot
    box: Box
    offset: int
    nbytes: int


def payload_layout(bucket: Bucket, boxes: Mapping[str, Box]) -> tuple[tuple[Piece, ...], int]:
    """What one rank receives of ``bucket``: its box of each slot, packed and aligned.

    ``boxes`` maps keys to this rank's box; keys it lacks are wanted whole.

    >>> slot = Slot("w", torch.float32, (4, 2), 0, 0, 32, row=4)  # rows 4..7 of an (8, 2)
    >>> pieces, n = payload_layout(Bucket(0, "f", 32, (slot,)), {"w": ((2, 0), (4, 2))})
    >>> pieces[0].box, pieces[0].nbytes, n
    (((4, 0), (2, 2)), 16, 16)
    """
    pieces, end = [], 0
    for slot in bucket.slots:
        box = intersect(slot.extent, boxes[slot.key]) if slot.key in boxes else slot.extent
        numel = 1
        for size in box[1]:
            numel *= size
        offset = _align(end)
        pieces.append(Piece(slot, box, offset, numel * slot.dtype.itemsize))
        end = offset + pieces[-1].nbytes
    return tuple(pieces), end


def intersect(a: Box, b: Box) -> Box:
    """The common part of two boxes (zero-sized where they do not meet).

    >>> intersect(((0, 0), (4, 4)), ((2, 1), (4, 2)))
    ((2, 1), (2, 2))
    """
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x + m, y + n) for x, m, y, n in zip(a[0], a[1], b[0], b[1]))
    return lo, tuple(max(0, h - low) for low, h in zip(lo, hi))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _interleave(per_owner: list[list[Bucket]]) -> tuple[Bucket, ...]:
    out = []
    for i in range(max((len(b) for b in per_owner), default=0)):
        out.extend(b[i] for b in per_owner if i < len(b))
    return tuple(out)
