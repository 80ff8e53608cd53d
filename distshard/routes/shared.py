"""What every route shares: the load's :class:`Context` (group, plan, reader, destinations,
each rank's boxes), the failure guard, fill accounting, reusable buffers and reader threads.

Collective discipline: a rank that fails keeps joining every collective (with whatever bytes it
has) and records its failure (:meth:`Context.guard`), to be raised by everyone at the next
agreement. A route must therefore never raise from a local step, only from a collective whose
peer is gone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import _faults
from ..comm import Comm, failure_of
from ..errors import DistShardError, RankFailure
from ..keymap import region, volume
from ..plan import Box, Bucket, LoadPlan, Piece, Slot
from ..reader import ShardReader
from ..topology import Topology

__all__ = ["READERS", "Buffers", "Context", "Route", "Step", "flat"]

# Reads in flight per rank (node image, and own rows of sharded tensors). With one reader per
# rank this machine's disk gave 0.8-1.0 GB/s to 2 ranks; with two, 1.1-1.4 GB/s (replicated, 4
# ranks: 1.35 -> 0.9 s of reading; sharded, 4 ranks: 1.33-1.43 -> 1.20-1.23 s per load).
READERS = 2


@dataclass(frozen=True, slots=True)
class Step:
    """One bucket this rank takes part in, and how it moves: ``route`` names the module.
    ``pieces``: this rank's pieces (own rows); ``wire`` and ``layouts``: the bucket as it
    travels and every rank's pieces of it (slices)."""

    route: str
    bucket: Bucket
    pieces: tuple[Piece, ...] = ()
    wire: Bucket | None = None
    layouts: tuple = ()


class Route(Protocol):
    """A way buckets move. ``collective``: its steps run on every member rank in plan order
    (consecutive steps of one route in one call); a route that is not collective reads only
    for its own rank, and its steps run together after the collective ones."""

    collective: bool

    def move(self, ctx: Context, steps: list[Step]) -> None: ...


class Context:
    """One rank's side of one load, as every route sees it."""

    def __init__(self, comm: Comm, plan: LoadPlan, reader: ShardReader,
                 dests: dict[str, torch.Tensor] | None, boxes: list[dict[str, Box]] | None,
                 topology: Topology, node_local: bool) -> None:
        self.comm, self.plan, self.reader, self.dests = comm, plan, reader, dests
        self.rank = comm.rank
        self.topology = topology
        # Node-local loads: each node's ranks read their own copy of every bucket and serve
        # only each other; a rank skips the buckets of other nodes.
        self.node_local = node_local
        self.boxes = boxes or [{}] * comm.world_size  # per rank; empty: every tensor whole
        self.buffers = Buffers(comm.device)
        self.failure: RankFailure | None = None
        self.bytes_received = 0  # from other ranks, through the collectives
        self.ahead = None  # this rank's buckets sent through the backend, read ahead
        self._filled: dict[str, int] = {}  # elements written into each destination
        self._filled_lock = threading.Lock()

    def members(self, bucket: Bucket) -> tuple[int, ...] | range:
        """The ranks a bucket serves: its reader's node when loading node-locally, else all."""
        if not self.node_local:
            return range(self.comm.world_size)
        return self.topology.ranks_on(self.topology.node_of[bucket.owner])

    def guard(self, phase: str, fn, *args) -> None:
        """Run a local step unless this rank already failed; record its failure. Never raises,
        so the collectives that follow still happen."""
        if self.failure is not None:
            return
        try:
            _faults.check(phase, self.rank)
            fn(*args)
        except Exception as e:
            self.failure = failure_of(e, self.rank, phase)

    def fill(self, key: str, box: Box) -> None:
        with self._filled_lock:  # reader threads fill pieces of one tensor side by side
            self._filled[key] = self._filled.get(key, 0) + volume(box[1])

    def fill_whole(self, buckets: list[Bucket]) -> None:
        """Every slot of ``buckets`` arrived whole (a node's shared copy, mapped at once)."""
        with self._filled_lock:
            filled = self._filled
            for bucket in buckets:
                for slot in bucket.slots:
                    filled[slot.key] = filled.get(slot.key, 0) + volume(slot.shape)

    def check_filled(self) -> None:
        """As many elements arrived for each destination as it holds: a plan that missed a row
        would otherwise hand back uninitialised memory."""
        for key, dest in (self.dests or {}).items():
            if self._filled.get(key, 0) != dest.numel():
                raise DistShardError(
                    f"internal error: {self._filled.get(key, 0)} of {dest.numel()} elements of "
                    f"{key!r} arrived; please report this", key=key)

    def dest(self, key: str, box: Box) -> torch.Tensor:
        """This rank's destination of ``box`` (whole-tensor coordinates) of tensor ``key``: a
        local shard starts at its own box's offset."""
        mine = self.boxes[self.rank]
        return self.dests[key][region(box, mine[key][0] if key in mine else None)]

    def direct(self, slot: Slot, box: Box) -> torch.Tensor | None:
        """The destination's own bytes for ``box`` of ``slot`` when it needs no conversion and
        is contiguous there (whole rows of a tensor or of a row-sharded local shard): it is
        then read or received in place, with no staging copy."""
        if self.dests is None:
            return None
        dest = self.dests[slot.key]
        if dest.dtype != slot.dtype or dest.device != self.comm.device:
            return None
        return flat(self.dest(slot.key, box))

    def unpack(self, slots, boxes, buf: torch.Tensor, *, from_bucket: bool = False,
               offsets: list[int] | None = None) -> None:
        """Copy (and convert) box ``boxes[i]`` of ``slots[i]`` into its destination; the data
        sits in ``buf`` at the slot's place in the bucket (``from_bucket``) or packed at
        ``offsets``."""
        self.guard("distribute", self._unpack, slots, boxes, buf, from_bucket, offsets)

    def _unpack(self, slots, boxes, buf, from_bucket, offsets) -> None:
        for i, (slot, box) in enumerate(zip(slots, boxes)):
            if from_bucket:
                src = slot_tensor(buf, slot)[region(box, slot.extent[0])]
            else:
                nbytes = volume(box[1]) * slot.dtype.itemsize
                src = buf[offsets[i]:offsets[i] + nbytes].view(slot.dtype).view(box[1])
            self.dest(slot.key, box).copy_(src)
            self.fill(slot.key, box)

    def start_readers(self, items: list, work: Callable[[ShardReader, object], None]
                      ) -> Callable[[], None]:
        """Run ``work(reader, item)`` for every item on :data:`READERS` threads, each with its
        own reader (its own open file), items dealt round robin; return the function that waits
        for them and counts their reads as this rank's. ``work`` must not raise (see guard)."""
        readers = [self.reader.clone() for _ in range(min(READERS, len(items)))]

        def loop(reader: ShardReader, share: list) -> None:
            try:
                for item in share:
                    work(reader, item)
            finally:
                reader.close()

        threads = [threading.Thread(target=loop, args=(r, items[i::len(readers)]), daemon=True,
                                    name=f"distshard-reader-{i}") for i, r in enumerate(readers)]
        for t in threads:
            t.start()

        def join() -> None:
            for t in threads:
                t.join()
            for r in readers:
                self.reader.absorb(r)

        return join


class Buffers:
    """Named reusable byte buffers on the collective's device (the bucket being read, the slices
    cut from it, what this rank receives), and for a CUDA group a pinned host buffer that the
    reader fills before the copy to the GPU. They only grow, so that a load does not churn the
    allocator: a freed buffer is not always returned to the system."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._named: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int, device: torch.device | None = None) -> torch.Tensor:
        buf = self._named.get(name)
        if buf is None or buf.numel() < nbytes:
            device = device or self.device
            pin = device.type == "cpu" and self.device.type == "cuda"
            self._named[name] = buf = torch.empty(nbytes, dtype=torch.uint8, device=device,
                                                  pin_memory=pin)
        return buf[:nbytes]

    def read_into(self, reader: ShardReader, bucket: Bucket, buf: torch.Tensor) -> None:
        if buf.device.type == "cpu":
            reader.read(bucket, buf)
            return
        host = self.get("host", bucket.nbytes, torch.device("cpu"))
        reader.read(bucket, host)
        buf.copy_(host)


def slot_tensor(buf: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The slot's box, typed, at its place in bucket bytes ``buf``."""
    return buf[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


def flat(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s own bytes, when it is contiguous and not empty."""
    return t.reshape(-1).view(torch.uint8) if t.is_contiguous() and t.numel() > 0 else None
