"""Every rank wants every tensor whole, on the CPU, and its node reads every byte itself (one
node, or node-local loads) from safetensors files, in the checkpoint's dtypes: the page cache
of the checkpoint files is the node's one copy.

1. :data:`~distshard.routes.shared.READERS` threads bring this rank's buckets into the page
   cache (``MADV_POPULATE_READ``: read at the disk's pace, copied nowhere);
2. one barrier; then every rank's tensors are views of its private (copy-on-write) mappings of
   the files (:func:`distshard.reader.map_files`): the node's one copy until the rank writes.
"""

from __future__ import annotations

from ..reader import map_files
from .shared import Context, Step

__all__ = ["PageCache"]


class PageCache:
    collective = True

    def move(self, ctx: Context, steps: list[Step]) -> None:
        run = [step.bucket for step in steps]
        ctx.start_readers([b for b in run if b.owner == ctx.rank],
                          lambda reader, bucket: ctx.guard("read", reader.populate, bucket))()
        ctx.bytes_received += sum(b.nbytes for b in run if b.owner != ctx.rank)  # via the node
        ctx.comm.barrier()
        ctx.guard("distribute", self._map, ctx, run)

    @staticmethod
    def _map(ctx: Context, run) -> None:
        ctx.dests = map_files(ctx.reader.root, ctx.plan, run)
        ctx.fill_whole(run)
