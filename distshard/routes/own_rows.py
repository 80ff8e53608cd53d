"""A bucket of DTensor shards made of whole rows, each byte wanted by exactly one rank: every
rank reads its own rows straight from the file into its shard (safetensors only), on
:data:`~distshard.routes.shared.READERS` threads. Nothing crosses the network and storage still
serves each byte once. Not collective: a rank's own reads run after the collective steps."""

from __future__ import annotations

import functools

import torch

from ..keymap import contiguous_start
from ..plan import Box, LoadPlan, Piece
from ..reader import ShardReader
from .shared import Context, Step

__all__ = ["OwnRows", "each_reads_own", "start_in_slot"]


class OwnRows:
    collective = False

    def move(self, ctx: Context, steps: list[Step]) -> None:
        batch = [(step.bucket.file, step.pieces) for step in steps]
        if len(batch) <= 1:
            for file, pieces in batch:
                ctx.guard("read", _read_own, ctx, ctx.reader, file, pieces)
            return
        ctx.start_readers(batch, lambda reader, item: ctx.guard(
            "read", _read_own, ctx, reader, *item))()


def each_reads_own(plan: LoadPlan, bucket, layouts) -> bool:
    """Whether every rank can read its own pieces (``layouts``: every rank's) of ``bucket``
    straight from the file: a safetensors bucket cut into whole rows, each byte wanted by
    exactly one rank."""
    if bucket.conversion is not None or plan.file(bucket.file).kind != "safetensors":
        return False
    pieces = [p for ps, _ in layouts for p in ps]
    return (all(start_in_slot(p) is not None for p in pieces)
            and sum(p.nbytes for p in pieces) == sum(s.nbytes for s in bucket.slots))


def start_in_slot(p: Piece) -> int | None:
    """Where the piece starts among its slot's elements, when it is a contiguous run of them
    (then it is a byte range of the file); None otherwise."""
    if p.nbytes == 0:
        return 0
    return _start(p.box, p.slot.extent[0], p.slot.shape)


@functools.lru_cache(maxsize=4096)  # (the pieces of a model's many tensors repeat a few boxes)
def _start(box: Box, at: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    return contiguous_start((tuple(o - a for o, a in zip(box[0], at)), box[1]), shape)


def _read_own(ctx: Context, reader: ShardReader, file: str, pieces: tuple[Piece, ...]) -> None:
    for p in pieces:
        if p.nbytes == 0:
            continue
        slot = p.slot
        begin = slot.begin + start_in_slot(p) * slot.dtype.itemsize
        dest = ctx.dest(slot.key, p.box)
        if dest.dtype == slot.dtype and dest.device.type == "cpu" and dest.is_contiguous():
            reader.read_range(file, slot.key, begin, dest)
        else:  # a staging piece of its own: readers run in parallel
            tmp = torch.empty(p.nbytes, dtype=torch.uint8, pin_memory=dest.is_cuda)
            reader.read_range(file, slot.key, begin, tmp)
            dest.copy_(tmp.view(slot.dtype).view(p.box[1]))
        ctx.fill(slot.key, p.box)
