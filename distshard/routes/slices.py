"""A bucket cut by its reader into each rank's pieces, sent point to point: shards that are not
whole rows, ``.bin`` files, conversions, or ``read_own_slices=False``. Ranks that need nothing of
it take no part. A rank's single piece that is contiguous (whole rows) goes straight from the
bucket and lands straight in its destination; other payloads are packed. A rank uses one bucket
buffer whether it sends or receives, plus the packed slices when it sends, plus what it reads
ahead (see :mod:`distshard.routes.readahead`)."""

from __future__ import annotations

import torch

from ..keymap import region
from ..plan import Piece
from .readahead import done_with, read_wire
from .shared import Context, Step, flat, slot_tensor

__all__ = ["Slices"]


class Slices:
    collective = True

    def move(self, ctx: Context, steps: list[Step]) -> None:
        for step in steps:
            if ctx.rank == step.bucket.owner:
                self._send(ctx, step)
            elif step.layouts[ctx.rank][1] > 0:
                self._receive(ctx, step)

    @staticmethod
    def _send(ctx: Context, step: Step) -> None:
        bucket, wire, layouts = step.bucket, step.wire, step.layouts
        me = ctx.rank
        full = read_wire(ctx, bucket, ctx.buffers.get("bucket", wire.nbytes), wire, scratch=True)
        sends, packed = [], []
        for r, (pieces, n) in enumerate(layouts):
            if r == me or n == 0:
                continue
            view = _single_contiguous(pieces, full)
            if view is not None:
                sends.append((view, r))
            else:
                packed.append(r)
        area = ctx.buffers.get("slices", sum(layouts[r][1] for r in packed))
        start = 0
        for r in packed:
            chunk = area[start:start + layouts[r][1]]
            start += layouts[r][1]
            ctx.guard("distribute", _pack, layouts[r][0], full, chunk)
            sends.append((chunk, r))
        ctx.comm.exchange(sends, [])
        mine = layouts[me][0]
        ctx.unpack([p.slot for p in mine], [p.box for p in mine], full, from_bucket=True)
        done_with(ctx, bucket)

    @staticmethod
    def _receive(ctx: Context, step: Step) -> None:
        mine, nbytes = step.layouts[ctx.rank]
        direct = ctx.direct(mine[0].slot, mine[0].box) if len(mine) == 1 else None
        received = direct if direct is not None else ctx.buffers.get("bucket", nbytes)
        ctx.comm.exchange([], [(received, step.bucket.owner)])
        ctx.bytes_received += nbytes
        if direct is None:
            ctx.unpack([p.slot for p in mine], [p.box for p in mine], received,
                       offsets=[p.offset for p in mine])
        elif ctx.failure is None:
            ctx.fill(mine[0].slot.key, mine[0].box)


def _single_contiguous(pieces: tuple[Piece, ...], full: torch.Tensor) -> torch.Tensor | None:
    """The bucket's own bytes for a payload of one piece that is contiguous in it."""
    if len(pieces) != 1:
        return None
    slot, box = pieces[0].slot, pieces[0].box
    return flat(slot_tensor(full, slot)[region(box, slot.extent[0])])


def _pack(pieces: tuple[Piece, ...], full: torch.Tensor, chunk: torch.Tensor) -> None:
    """Cut each piece's box out of the whole bucket ``full`` into ``chunk``."""
    for p in pieces:
        part = slot_tensor(full, p.slot)[region(p.box, p.slot.extent[0])]
        chunk[p.offset:p.offset + p.nbytes].view(p.slot.dtype).view(p.box[1]).copy_(part)
