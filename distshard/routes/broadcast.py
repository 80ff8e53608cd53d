"""A bucket every rank wants whole, broadcast by the backend into each rank's own tensors (or,
node-locally, sent by its reader to its own node's ranks). A bucket of one tensor that needs no
conversion is read and received straight into the destination; others go through one bucket
buffer. A floating tensor whose destination is narrower travels narrowed (see
:func:`distshard.routes.choose.wire_of`)."""

from __future__ import annotations

from .choose import wire_of
from .readahead import done_with, read_wire
from .shared import Context, Step

__all__ = ["Broadcast"]


class Broadcast:
    collective = True

    def move(self, ctx: Context, steps: list[Step]) -> None:
        for step in steps:
            self._one(ctx, step.bucket)

    @staticmethod
    def _one(ctx: Context, bucket) -> None:
        wire = wire_of(bucket, ctx.dests)
        direct = ctx.direct(wire.slots[0], wire.slots[0].extent) if len(wire.slots) == 1 else None
        buf = direct if direct is not None else ctx.buffers.get("bucket", wire.nbytes)
        buf = read_wire(ctx, bucket, buf, wire, scratch=direct is None)
        members = ctx.members(bucket)
        if len(members) == ctx.comm.world_size:
            ctx.comm.broadcast(buf, bucket.owner)
        elif ctx.rank == bucket.owner:  # one node of several: only to the node's ranks
            ctx.comm.exchange([(buf, r) for r in members if r != bucket.owner], [])
        else:
            ctx.comm.exchange([], [(buf, bucket.owner)])
        if bucket.owner != ctx.rank:
            ctx.bytes_received += wire.nbytes
        if direct is None:
            ctx.unpack(wire.slots, [s.extent for s in wire.slots], buf, from_bucket=True)
        elif ctx.failure is None:
            ctx.fill(wire.slots[0].key, wire.slots[0].extent)
        done_with(ctx, bucket)
