"""The buckets a rank sends through the backend (broadcast, slices), read ahead of their turn;
and the owner's one way to get a bucket's bytes as they travel (:func:`read_wire`)."""

from __future__ import annotations

import threading

import torch

from ..plan import Bucket
from .shared import Context, slot_tensor

__all__ = ["ReadAhead", "done_with", "read_wire"]


class ReadAhead:
    """Reads this rank's buckets that go through the backend ahead, in plan order, on one
    thread, into one host buffer: as soon as the rank has sent its bucket, its next one is read
    while the collectives of the buckets between them (other ranks', in the plan's interleaved
    order) go on. One bucket of staging; the thread is at most one bucket ahead."""

    def __init__(self, ctx: Context, buckets: list[Bucket]) -> None:
        self._ctx, self._buckets = ctx, buckets
        self._index = {id(b): i for i, b in enumerate(buckets)}
        self._ready = [threading.Event() for _ in buckets]
        self._held: list[torch.Tensor | None] = [None] * len(buckets)
        self._free = threading.Semaphore(1)
        self._stop = False
        pin = ctx.comm.device.type == "cuda"
        self._buffer = torch.empty(max(b.nbytes for b in buckets), dtype=torch.uint8,
                                   pin_memory=pin)
        self._reader = ctx.reader.clone()
        self._thread = threading.Thread(target=self._run, daemon=True, name="distshard-ahead")
        self._thread.start()

    def _run(self) -> None:
        try:
            for i, bucket in enumerate(self._buckets):
                self._free.acquire()
                if self._stop:
                    return
                held = self._buffer[:bucket.nbytes]
                self._ctx.guard("read", self._reader.read, bucket, held)
                self._held[i] = held
                self._ready[i].set()
        finally:
            for event in self._ready:  # nobody waits forever, whatever happened here
                event.set()
            self._reader.close()

    def take(self, bucket: Bucket) -> torch.Tensor | None:
        """The bucket as read (file layout, host memory), once it is; None if not read ahead."""
        i = self._index.get(id(bucket))
        if i is None:
            return None
        self._ready[i].wait()
        held = self._held[i]
        return held if held is not None else self._buffer[:bucket.nbytes]

    def release(self, bucket: Bucket) -> None:
        """The owner has sent ``bucket``: the buffer may take the next one."""
        if id(bucket) in self._index:
            self._free.release()

    def close(self) -> None:
        self._stop = True
        self._free.release()
        self._thread.join()
        self._ctx.reader.absorb(self._reader)
        self._buffer = self._held = None


def read_wire(ctx: Context, bucket: Bucket, buf: torch.Tensor, wire: Bucket | None = None, *,
              scratch: bool = False) -> torch.Tensor:
    """On the owner, ``bucket`` laid out as ``wire`` (default: as read) in ``buf``, or, where
    ``buf`` is only scratch space, in the buffer it was read ahead into; return that buffer.
    Other ranks get ``buf`` back."""
    if bucket.owner != ctx.rank:
        return buf
    ahead = ctx.ahead.take(bucket) if ctx.ahead is not None else None
    narrowed = wire is not None and wire is not bucket
    if ahead is not None:
        if not narrowed and scratch and ahead.device == buf.device:
            return ahead  # sent straight from where it was read
        src = ahead
        if narrowed and ahead.device != buf.device:
            src = ctx.buffers.get("raw", bucket.nbytes)
            ctx.guard("distribute", src.copy_, ahead)
        if narrowed:
            ctx.guard("distribute", _convert, bucket, src, wire, buf)
        else:
            ctx.guard("distribute", buf.copy_, ahead)
        return buf
    if not narrowed:
        ctx.guard("read", ctx.buffers.read_into, ctx.reader, bucket, buf)
        return buf
    raw = ctx.buffers.get("raw", bucket.nbytes)
    ctx.guard("read", ctx.buffers.read_into, ctx.reader, bucket, raw)
    ctx.guard("distribute", _convert, bucket, raw, wire, buf)
    return buf


def done_with(ctx: Context, bucket: Bucket) -> None:
    """The owner has sent ``bucket``: its read-ahead buffer may take the next one."""
    if bucket.owner == ctx.rank and ctx.ahead is not None:
        ctx.ahead.release(bucket)


def _convert(bucket: Bucket, raw: torch.Tensor, wire: Bucket, buf: torch.Tensor) -> None:
    """Each slot of ``bucket`` in ``raw``, converted into its place and dtype in ``wire``."""
    for s, w in zip(bucket.slots, wire.slots):
        slot_tensor(buf, w).copy_(slot_tensor(raw, s))
