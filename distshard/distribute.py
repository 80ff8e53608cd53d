"""Move each bucket from the rank that read it to the ranks that need it.

A bucket that every rank wants whole (plain tensors, replicated DTensors) is broadcast. A bucket
holding DTensor shards is scattered: the reader cuts each rank's boxes out of the bucket and each
rank receives only its own, so no rank ever holds a full copy of a tensor it did not read.

Collective: every rank of the group runs :meth:`Exchange.run` over the same plan. A rank that
fails keeps joining every collective (with whatever bytes it has) and returns its failure, to be
raised by everyone at the next agreement.
"""

from __future__ import annotations

import torch

from . import _faults
from .comm import Comm, failure_of
from .errors import RankFailure
from .plan import Box, Bucket, LoadPlan, Piece, payload_layout
from .reader import ShardReader

__all__ = ["Exchange"]


class Exchange:
    def __init__(self, comm: Comm, plan: LoadPlan, reader: ShardReader,
                 dests: dict[str, torch.Tensor] | None, boxes: list[dict[str, Box]] | None) -> None:
        self.comm, self.plan, self.reader, self.dests = comm, plan, reader, dests
        self.boxes = boxes or [{}] * comm.world_size  # per rank; empty: every tensor whole
        self.staging = _Staging(comm.device)
        self.failure: RankFailure | None = None

    def run(self) -> RankFailure | None:
        for bucket in self.plan.buckets:
            layouts = [payload_layout(bucket, b) for b in self.boxes]
            whole = all(p.box == p.slot.extent for pieces, _ in layouts for p in pieces)
            if whole:
                self._broadcast(bucket, layouts[self.comm.rank][0])
            else:
                self._scatter(bucket, layouts)
        return self.failure

    def _broadcast(self, bucket: Bucket, pieces: tuple[Piece, ...]) -> None:
        direct = self._direct_buffer(bucket)
        buf = direct if direct is not None else self.staging.get(bucket.nbytes)
        self._read(bucket, buf)
        self.comm.broadcast(buf, bucket.owner)
        if direct is None:
            self._unpack(pieces, buf)

    def _scatter(self, bucket: Bucket, layouts: list[tuple[tuple[Piece, ...], int]]) -> None:
        size = max(n for _, n in layouts)
        chunks = None
        if self.comm.rank == bucket.owner:
            full = self.staging.get(bucket.nbytes)
            self._read(bucket, full)
            chunks = [torch.empty(size, dtype=torch.uint8, device=self.comm.device)
                      for _ in layouts]
            if self.failure is None:
                try:
                    for (pieces, _), chunk in zip(layouts, chunks):
                        _pack(pieces, full, chunk)
                except Exception as e:
                    self.failure = failure_of(e, self.comm.rank, "distribute")
        received = torch.empty(size, dtype=torch.uint8, device=self.comm.device)
        self.comm.scatter(received, chunks, bucket.owner)
        self._unpack(layouts[self.comm.rank][0], received)

    def _read(self, bucket: Bucket, buf: torch.Tensor) -> None:
        if bucket.owner != self.comm.rank or self.failure is not None:
            return
        try:
            _faults.check("read", self.comm.rank)
            self.staging.read_into(self.reader, bucket, buf)
        except Exception as e:
            self.failure = failure_of(e, self.comm.rank, "read")

    def _unpack(self, pieces: tuple[Piece, ...], buf: torch.Tensor) -> None:
        """Copy (and convert) each received piece into its destination."""
        if self.failure is not None:
            return
        try:
            _faults.check("distribute", self.comm.rank)
            mine = self.boxes[self.comm.rank]
            for p in pieces:
                src = buf[p.offset:p.offset + p.nbytes].view(p.slot.dtype).view(p.box[1])
                origin = mine[p.slot.key][0] if p.slot.key in mine else None
                self.dests[p.slot.key][_region(p.box, origin)].copy_(src)
        except Exception as e:
            self.failure = failure_of(e, self.comm.rank, "distribute")

    def _direct_buffer(self, bucket: Bucket) -> torch.Tensor | None:
        """The destination's own bytes, when a bucket is one tensor that needs no conversion:
        it is then read or received in place, with no staging copy."""
        if self.dests is None or len(bucket.slots) != 1:
            return None
        slot = bucket.slots[0]
        dest = self.dests[slot.key]
        if dest.dtype != slot.dtype or dest.device != self.comm.device or slot.nbytes == 0:
            return None
        rows = dest[slot.row:slot.row + slot.shape[0]] if slot.shape else dest
        return rows.reshape(-1).view(torch.uint8)


def _pack(pieces: tuple[Piece, ...], full: torch.Tensor, chunk: torch.Tensor) -> None:
    """Cut each piece's box out of the whole bucket ``full`` into ``chunk``."""
    for p in pieces:
        slot = p.slot
        held = full[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
        region = held[_region(p.box, slot.extent[0])]
        chunk[p.offset:p.offset + p.nbytes].view(slot.dtype).view(p.box[1]).copy_(region)


def _region(box: Box, origin: tuple[int, ...] | None) -> tuple[slice, ...]:
    """Index of ``box`` (whole-tensor coordinates) in a tensor that starts at ``origin``."""
    origin = origin or (0,) * len(box[0])
    return tuple(slice(o - z, o - z + n) for o, n, z in zip(box[0], box[1], origin))


class _Staging:
    """A reusable bucket buffer on the collective's device, and for a CUDA group one in pinned
    host memory that the reader fills before the copy to the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buf = torch.empty(0, dtype=torch.uint8, device=device)
        self._host = self._buf if device.type == "cpu" else torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._buf[:nbytes]

    def read_into(self, reader: ShardReader, bucket: Bucket, buf: torch.Tensor) -> None:
        if buf.device.type == "cpu":
            reader.read(bucket, buf)
            return
        if self._host.numel() < bucket.nbytes:
            self._host = torch.empty(bucket.nbytes, dtype=torch.uint8, pin_memory=True)
        host = self._host[:bucket.nbytes]
        reader.read(bucket, host)
        buf.copy_(host)
