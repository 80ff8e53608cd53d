"""Who reads what, and in which order tensors are distributed: a frozen, picklable plan.

Pure: no files, no torch.distributed. Rank 0 builds the plan and broadcasts it; every rank then
walks ``plan.buckets`` in the same order, which is what keeps the collectives matched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .boxes import intersect
from .index import FileInfo, TensorInfo
from .keymap import Box, Conversion, Part, contiguous_start, leaf, volume
from .record import paused_gc, per_tensor

__all__ = [
    "ALIGN",
    "Box",
    "Bucket",
    "LoadPlan",
    "Piece",
    "PlannedFile",
    "Slot",
    "SourceRead",
    "align",
    "assign_ranges",
    "make_plan",
    "payload_layout",
    "scaled_bucket_size",
]

# Every slot of a bucket starts at a multiple of ALIGN bytes, so that a uint8 bucket can be
# viewed as any dtype in place.
ALIGN = 16


@per_tensor
class Slot:
    """A box of model tensor ``key`` inside a bucket: ``nbytes`` bytes at ``offset`` in the
    bucket, read from byte ``begin`` of the file (``None`` for ``.bin`` files, read by key). The
    box starts at ``at`` (default: the origin) and has ``shape``; its bytes are elements
    ``first ..`` of checkpoint tensor ``source`` (default: ``key``), a contiguous run of it, in
    the same row-major order (see :class:`distshard.keymap.Part`)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int | None
    offset: int
    nbytes: int
    at: tuple[int, ...] = ()
    source: str = ""
    first: int = 0

    @property
    def extent(self) -> Box:
        """The part of the whole model tensor this slot holds, as a box."""
        return (self.at or (0,) * len(self.shape)), self.shape

    @property
    def source_key(self) -> str:
        return self.source or self.key


@dataclass(frozen=True, slots=True)
class SourceRead:
    """A checkpoint tensor read whole by the owner of a conversion bucket."""

    file: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int | None

    @property
    def nbytes(self) -> int:
        return volume(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Bucket:
    """A flat byte buffer that ``owner`` fills from ``file`` and broadcasts to every rank.

    A conversion bucket (``conversion`` set) is filled otherwise: its owner reads ``sources``
    whole, runs the conversion, and its slots hold the resulting model tensors, whole."""

    owner: int
    file: str
    nbytes: int
    slots: tuple[Slot, ...]
    conversion: Conversion | None = None
    sources: tuple[SourceRead, ...] = ()

    @property
    def read_bytes(self) -> int:
        """Bytes its owner reads from storage."""
        if self.conversion is not None:
            return sum(s.nbytes for s in self.sources)
        return sum(s.nbytes for s in self.slots)


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """A checkpoint file as rank 0 saw it; readers refuse it if it has changed since."""

    name: str
    kind: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class LoadPlan:
    world_size: int
    bucket_size: int
    files: tuple[PlannedFile, ...]
    buckets: tuple[Bucket, ...]
    identity: bool = True  # every model tensor is one run of one checkpoint tensor (a view of it)

    def bytes_per_rank(self) -> list[int]:
        """Bytes each rank reads from storage when it reads whole buckets."""
        loads = [0] * self.world_size
        for b in self.buckets:
            loads[b.owner] += b.read_bytes
        return loads

    def file(self, name: str) -> PlannedFile:
        return next(f for f in self.files if f.name == name)

    def __reduce__(self):
        # Pickled as plain tuples (see _to_wire): rank 0 sends the plan to every rank, and a
        # dataclass per slot pickles and unpickles about 4x slower than a tuple per slot.
        return _from_wire, (_to_wire(self),)


def _to_wire(plan: LoadPlan) -> tuple:
    """``plan`` as tuples: each slot one tuple, its dtype, shape and origin as indices into
    tables of the distinct ones, its source None where it is the key (the same string)."""
    table: dict = {}  # distinct dtypes, shapes and origins -> index

    def index(value) -> int:
        i = table.get(value)
        if i is None:
            i = table[value] = len(table)
        return i

    buckets = []
    for b in plan.buckets:
        slots = tuple((s.key, index(s.dtype), index(s.shape), s.begin, s.offset, s.nbytes,
                       index(s.at), None if s.source is s.key else s.source, s.first)
                      for s in b.slots)
        buckets.append((b.owner, b.file, b.nbytes, slots, b.conversion, b.sources))
    return (plan.world_size, plan.bucket_size, plan.files, plan.identity, tuple(table),
            tuple(buckets))


def _from_wire(wire: tuple) -> LoadPlan:
    world_size, bucket_size, files, identity, values, buckets = wire
    with paused_gc():
        return LoadPlan(world_size, bucket_size, files, tuple(
            Bucket(owner, file, nbytes, tuple(
                Slot(key, values[dtype], values[shape], begin, offset, n, values[at],
                     key if source is None else source, first)
                for key, dtype, shape, begin, offset, n, at, source, first in slots),
                conversion, sources)
            for owner, file, nbytes, slots, conversion, sources in buckets), identity)


def assign_ranges(nbytes: Sequence[int], world_size: int) -> list[int]:
    """Cut a sequence of byte runs (the buckets of every file, in file order) into
    ``world_size`` contiguous stretches of nearly equal bytes: each run goes to the rank whose
    stretch holds its midpoint. Deterministic; every rank reads one near-sequential stretch, and
    the heaviest carries at most ``total / world_size + max(run)``.

    >>> assign_ranges([5, 5, 5, 5], 2), assign_ranges([9, 1, 1, 1], 2), assign_ranges([3], 3)
    ([0, 0, 1, 1], [0, 1, 1, 1], [1])
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    total = sum(nbytes)
    owners, start = [], 0
    for n in nbytes:  # midpoint start + n/2, in integers: exact for any size
        owners.append(min(world_size - 1, (2 * start + n) * world_size // (2 * total)) if total else 0)
        start += n
    return owners


# A small checkpoint still gets a few buckets per rank (balance within a bucket, reads that
# overlap the exchange), but no bucket so small that per-bucket overheads dominate.
BUCKETS_PER_RANK = 4
MIN_BUCKET = 1 << 20


def scaled_bucket_size(bucket_size: int, total: int, world_size: int) -> int:
    """``bucket_size``, or less where the checkpoint would give a rank fewer than
    :data:`BUCKETS_PER_RANK` buckets (never below :data:`MIN_BUCKET` on that account).

    >>> scaled_bucket_size(64 << 20, 168 << 20, 4) >> 20, scaled_bucket_size(64 << 20, 8 << 30, 4) >> 20
    (10, 64)
    >>> scaled_bucket_size(8192, 1 << 30, 2), scaled_bucket_size(64 << 20, 1000, 2) >> 20
    (8192, 1)
    """
    share = -(-total // (world_size * BUCKETS_PER_RANK))
    return min(bucket_size, max(MIN_BUCKET, share))


def make_plan(files: Sequence[FileInfo], world_size: int, bucket_size: int,
              readers: Sequence[Sequence[int]] | None = None, *,
              parts: Mapping[str, Sequence[Part]] | None = None,
              conversions: Sequence[Conversion] = (),
              outputs: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> LoadPlan:
    """Plan the load of the tensors listed in ``files`` (only those the model needs).

    Buckets never mix files and keep a file's tensors in file order, so one bucket is one
    near-sequential read; a tensor larger than ``bucket_size`` is cut into runs (contiguous
    bytes) that fill one bucket each, so staging never exceeds ``bucket_size`` unless a single
    row does. Ranks read byte ranges, not whole files: the buckets of all files, in file order,
    are cut into one stretch per rank (:func:`assign_ranges`), so even a single-file checkpoint
    is shared evenly. Buckets of different ranks are interleaved so that reads spread over
    ranks. ``bucket_size`` is an upper bound: a small checkpoint gets smaller buckets
    (:func:`scaled_bucket_size`), recorded in the plan.

    ``parts`` maps a checkpoint key to the boxes of model tensors it forms (default: each key is
    the model tensor of that name, whole); each part is read as the byte range it is. Each of
    ``conversions`` gets one bucket, placed after the file of its first source: its owner reads
    the sources whole and the bucket holds the model tensors it makes (shapes and dtypes in
    ``outputs``).

    ``readers`` (default: every rank, once) lists groups of ranks that each read the whole
    checkpoint among themselves — one group per node for node-local loading: the plan then
    holds one copy of every bucket per group, owned by that group's ranks.
    """
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be positive, got {bucket_size}")
    with paused_gc():
        return _make_plan(files, world_size, bucket_size, readers, parts, conversions, outputs)


def _make_plan(files, world_size, bucket_size, readers, parts, conversions, outputs) -> LoadPlan:
    readers = [tuple(g) for g in readers] if readers is not None else [tuple(range(world_size))]
    total = sum(t.nbytes for f in files for t in f.tensors.values())
    bucket_size = scaled_bucket_size(bucket_size, total, max(len(g) for g in readers))
    ordered = sorted(files, key=lambda f: f.name)
    after: dict[str, list[Bucket]] = {}
    for c in conversions:
        bucket = _conversion_bucket(c, files, outputs or {})
        after.setdefault(bucket.file, []).append(bucket)
    tape = [b for f in ordered for b in _pack(f, bucket_size, parts) + after.get(f.name, [])]
    per_owner: list[list[Bucket]] = [[] for _ in range(world_size)]
    for group in readers:
        owners = assign_ranges([b.read_bytes for b in tape], len(group))
        for bucket, owner in zip(tape, owners):
            per_owner[group[owner]].append(dataclasses.replace(bucket, owner=group[owner]))
    planned = tuple(PlannedFile(f.name, f.kind, f.size, f.mtime_ns) for f in ordered)
    # (one part per target: as many parts as targets)
    every = (parts or {}).values()
    identity = not conversions and sum(map(len, every)) == len({p.target for ps in every
                                                                for p in ps})
    return LoadPlan(world_size, bucket_size, planned, _interleave(per_owner), identity)


def _pack(f: FileInfo, bucket_size: int, parts: Mapping[str, Sequence[Part]] | None) -> list[Bucket]:
    order = sorted(f.tensors.items(), key=lambda kv: (kv[1].begin or 0, kv[0]))
    buckets: list[Bucket] = []
    open_slots: list[Slot] = []
    end = 0
    for key, t in order:
        size = t.dtype.itemsize
        if parts is None:  # the tensor whole, under its own name (a leaf)
            mine = None
            nbytes = t.nbytes
        else:
            mine = parts.get(key, ())
            if not mine:
                continue
            if len(mine) > 1:  # in file order
                mine = sorted(mine, key=lambda p: contiguous_start(p.source_box, t.shape))
        for p in (None,) if mine is None else mine:
            if p is not None:  # (a part that is all of its source: the tensor's bytes)
                nbytes = t.nbytes if p.source_box[1] == t.shape else p.numel * size
            if nbytes > bucket_size:  # a bucket of its own for each run
                if open_slots:  # keep file order: close the open bucket first
                    buckets.append(Bucket(0, f.name, end, tuple(open_slots)))
                    open_slots, end = [], 0
                runs = _runs(p if p is not None else leaf(key, t.shape).named(key)[0], t,
                             bucket_size)
                buckets.extend(Bucket(0, f.name, s.nbytes, (s,)) for s in runs)
                continue
            offset = align(end)
            if open_slots and offset + nbytes > bucket_size:
                buckets.append(Bucket(0, f.name, end, tuple(open_slots)))
                open_slots, offset = [], 0
            open_slots.append(_slot(key, t, p, offset, nbytes))
            end = offset + nbytes
    if open_slots:
        buckets.append(Bucket(0, f.name, end, tuple(open_slots)))
    return buckets


def _slot(key: str, t: TensorInfo, p: Part | None, offset: int, nbytes: int) -> Slot:
    """The one slot of part ``p`` of checkpoint tensor ``key`` (None: all of it, as itself),
    at ``offset`` of its bucket."""
    if p is None:
        return Slot(key, t.dtype, t.shape, t.begin, offset, nbytes, (0,) * len(t.shape), key, 0)
    sbox = p.source_box
    first = 0 if sbox[1] == t.shape else contiguous_start(sbox, t.shape)  # a whole box starts at 0
    begin = None if t.begin is None else t.begin + first * t.dtype.itemsize
    return Slot(p.target, t.dtype, p.box[1], begin, offset, nbytes, p.box[0], p.source, first)


def _runs(p: Part, t: TensorInfo, bucket_size: int) -> list[Slot]:
    size = t.dtype.itemsize
    first = contiguous_start(p.source_box, t.shape)
    ssize, (off, shape) = p.source_box[1], p.box
    lead = next((k for k, n in enumerate(ssize) if n > 1), None)
    if p.numel * size <= bucket_size or lead is None:
        begin = None if t.begin is None else t.begin + first * size
        return [Slot(p.target, t.dtype, shape, begin, 0, p.numel * size, off, p.source, first)]
    row = volume(ssize[lead + 1:])  # elements per step along the leading dimension
    step = max(1, bucket_size // (row * size))
    d = p.dims[lead]
    runs = []
    for r in range(0, ssize[lead], step):
        n = min(step, ssize[lead] - r)
        start = first + r * row
        begin = None if t.begin is None else t.begin + start * size
        runs.append(Slot(p.target, t.dtype, shape[:d] + (n,) + shape[d + 1:], begin, 0,
                         n * row * size, off[:d] + (off[d] + r,) + off[d + 1:], p.source, start))
    return runs


def _conversion_bucket(c: Conversion, files: Sequence[FileInfo],
                       outputs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> Bucket:
    where = {key: f for f in files for key in f.tensors}
    sources = tuple(SourceRead(where[k].name, k, where[k].tensors[k].dtype,
                               where[k].tensors[k].shape, where[k].tensors[k].begin)
                    for k in c.sources)
    slots, end = [], 0
    for target in c.targets:
        shape, dtype = outputs[target]
        offset = align(end)
        slots.append(Slot(target, dtype, shape, None, offset, volume(shape) * dtype.itemsize))
        end = offset + slots[-1].nbytes
    return Bucket(0, sources[0].file, end, tuple(slots), c, sources)


@per_tensor
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

    >>> slot = Slot("w", torch.float32, (4, 2), 0, 0, 32, at=(4, 0))  # rows 4..7 of an (8, 2)
    >>> pieces, n = payload_layout(Bucket(0, "f", 32, (slot,)), {"w": ((2, 0), (4, 2))})
    >>> pieces[0].box, pieces[0].nbytes, n
    (((4, 0), (2, 2)), 16, 16)
    """
    pieces, end = [], 0
    met: dict[tuple[Box, Box], Box] = {}  # (extent, box) -> common part: experts repeat them
    for slot in bucket.slots:
        if boxes and slot.key in boxes:
            pair = (slot.extent, boxes[slot.key])
            box = met.get(pair) or met.setdefault(pair, intersect(*pair))
        else:
            box = (slot.at or (0,) * len(slot.shape), slot.shape)  # slot.extent
        numel = 1
        for size in box[1]:
            numel *= size
        offset = (end + ALIGN - 1) // ALIGN * ALIGN
        nbytes = numel * slot.dtype.itemsize
        pieces.append(Piece(slot, box, offset, nbytes))
        end = offset + nbytes
    return tuple(pieces), end


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _interleave(per_owner: list[list[Bucket]]) -> tuple[Bucket, ...]:
    out = []
    for i in range(max((len(b) for b in per_owner), default=0)):
        out.extend(b[i] for b in per_owner if i < len(b))
    return tuple(out)
