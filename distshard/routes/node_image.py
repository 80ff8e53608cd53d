"""Every rank wants every tensor whole, on the CPU, and its node cannot map the checkpoint
files (several nodes share the reading, ``.bin`` files, other dtypes, fused layouts): one image
of the tensors per node, in ``/dev/shm`` (:class:`distshard.shm.NodeImage`, laid out by
:class:`~distshard.routes.image_layout.ImageLayout`), into which each byte is read once per job.

1. :data:`~distshard.routes.shared.READERS` threads read this rank's buckets straight into its
   node's image (several reads in flight: one stream rarely fills a disk), converting to the
   parameters' dtype on the way where they differ;
2. meanwhile, in plan order, each bucket goes from its reader to one rank of every other node,
   which receives it into that node's image (point to point; nothing on one node): converted
   where that made it smaller, else as read, converted by the receiver (a reader keeps at most
   one such bucket read and not yet sent). The buckets that the owners read at the same time
   (one round of the plan's turns) cross together, and the receivers allocate the image's pages
   for what they will receive ahead of it, on a thread of their own, while the disk paces the
   load: the sends then keep up with the reads, and little is left to send once the disk is
   done (with the plan's smaller buckets for such loads,
   :data:`~distshard.options.CROSSING_BUCKET_SIZE`); a rank done with a bucket's bytes drops
   its page-table entries of them, so that closing its shared mapping after the last read is
   cheap;
3. one barrier; then every rank's tensors are views of its private mapping of the image.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..plan import Bucket
from ..reader import ShardReader
from ..shm import NodeImage
from ..topology import Topology
from .image_layout import ImageLayout
from .shared import Context, Step, slot_tensor

__all__ = ["NodeImageRoute"]


class NodeImageRoute:
    collective = True

    def __init__(self, image: NodeImage, layout: ImageLayout) -> None:
        self.image, self.layout = image, layout

    def move(self, ctx: Context, steps: list[Step]) -> None:
        run = [step.bucket for step in steps]  # every bucket of the load
        me, topo = ctx.rank, ctx.topology
        crossing = topo.num_nodes > 1 and not ctx.node_local
        mine = [j for j, bucket in enumerate(run) if bucket.owner == me]
        spans, crosses_raw = self._spans(run, crossing, me)
        ready = {j: threading.Event() for j in mine}
        as_read: dict[int, torch.Tensor] = {}  # read, not yet sent: buckets that cross as read
        gates: dict[int, threading.Semaphore] = {}  # per reader: one such bucket at a time
        room: dict[int, threading.Semaphore] = {}  # each such bucket's reader's gate
        stop = threading.Event()  # a collective failed: readers leave their remaining buckets

        def read_one(reader: ShardReader, j: int) -> None:
            if stop.is_set():
                return
            keep = crosses_raw[j]
            if keep:
                room[j] = gates.setdefault(id(reader), threading.Semaphore(1))
                room[j].acquire()  # released once its previous such bucket has been sent
                if stop.is_set():
                    return
            self._read(reader, run[j], as_read, j, keep)

        def read(reader: ShardReader, j: int) -> None:
            try:
                ctx.guard("read", read_one, reader, j)
            finally:
                ready[j].set()  # even if it failed: the bucket is sent (and the load fails)

        join = ctx.start_readers(mine, read)
        try:
            if crossing:
                join = self._prefault_receipts(ctx, run, spans, crosses_raw, stop, join)
            rounds = self._rounds(run, crosses_raw) if crossing else [[j] for j in range(len(run))]
            for group in rounds:
                for j in group:
                    if run[j].owner == me:
                        ready[j].wait()  # sent in plan order, whichever thread read it
                    else:
                        ctx.bytes_received += run[j].nbytes
                if crossing:
                    self._cross_nodes(ctx, group, run, spans, crosses_raw, as_read)
                    for j in group:
                        if j in room:
                            room[j].release()
                self._forget(ctx, group, run, spans)
        except BaseException:  # a peer is gone: no reader may wait for a send that won't come
            stop.set()
            for gate in list(gates.values()):
                gate.release()
            join()
            raise
        join()
        ctx.comm.barrier()
        ctx.guard("distribute", self._map, ctx, run)

    def _read(self, reader: ShardReader, bucket: Bucket, as_read: dict[int, torch.Tensor],
              j: int, keep: bool) -> None:
        """Read ``bucket`` into the image; keep it as read in ``as_read[j]`` too if ``keep``.
        Straight into the image where every slot keeps its dtype and is contiguous there (a
        whole tensor, rows of one, an expert's box of a fused tensor), else through one staged
        bucket."""
        layout, data = self.layout, self.image.data
        if not keep and all(s.dtype == layout.dtype[s.key] and layout.contiguous(s)
                            for s in bucket.slots):  # each slot straight into its place
            reader.read_slots(bucket, [layout.slot_bytes(data, s) for s in bucket.slots])
            return
        staged = torch.empty(bucket.nbytes, dtype=torch.uint8)  # one bucket per thread
        reader.read(bucket, staged)
        self._convert_into_image(bucket, staged)
        if keep:
            as_read[j] = staged

    def _convert_into_image(self, bucket: Bucket, staged: torch.Tensor) -> None:
        for s in bucket.slots:
            self.layout.slot_view(self.image.data, s).copy_(slot_tensor(staged, s))

    def _spans(self, run: list[Bucket], crossing: bool, me: int
               ) -> tuple[list[tuple[int, int] | None], list[bool]]:
        """Each bucket's run of image bytes (:meth:`ImageLayout.run`: None where it is not one
        run; where nothing crosses nodes, only of this rank's own buckets, the only ones it
        maps), and whether it crosses nodes as read (False where nothing crosses): where it is
        not one run of the image (boxes of fused tensors), or is smaller as read than converted
        (its dtypes widen). The same on every rank; each a pass over the bucket's slots, made
        once per move rather than by each step that needs it."""
        if not crossing:
            return ([self.layout.run(b) if b.owner == me else None for b in run],
                    [False] * len(run))
        spans = [self.layout.run(bucket) for bucket in run]
        dtype = self.layout.dtype
        return spans, [span is None or (any(s.dtype != dtype[s.key] for s in bucket.slots)
                                        and bucket.nbytes < span[1] - span[0])
                       for bucket, span in zip(run, spans)]

    def _prefault_receipts(self, ctx: Context, run: list[Bucket],
                           spans: list[tuple[int, int] | None], crosses_raw: list[bool],
                           stop: threading.Event,
                           join: Callable[[], None]) -> Callable[[], None]:
        """Allocate the image's pages for what this rank will receive, in plan order, on a
        thread of their own while the disk paces the load: receiving then copies into pages
        that exist (allocating each page as the bytes arrive takes about as long as the copy).
        Returns ``join`` that waits for this thread too."""
        topo, me = ctx.topology, ctx.rank
        ranges = [spans[j] for j, bucket in enumerate(run)
                  if not crosses_raw[j] and _receives(topo, j, bucket, me)]

        done = threading.Event()  # the exchange is over: what is left has been received

        def work() -> None:
            for begin, end in ranges:
                if done.is_set() or stop.is_set() or not self.image.prefault(begin, end):
                    return

        thread = threading.Thread(target=work, daemon=True, name="distshard-prefault")
        thread.start()

        def join_both() -> None:
            done.set()
            thread.join()
            join()

        return join_both

    def _forget(self, ctx: Context, group: list[int], run: list[Bucket],
                spans: list[tuple[int, int] | None]) -> None:
        """This rank is done with the image's bytes of ``group`` (read, sent, received): drop
        its page-table entries of them now, while the disk paces the load, rather than all at
        once when the shared mapping closes after the last read."""
        topo, me = ctx.topology, ctx.rank
        for j in group:
            bucket = run[j]
            if bucket.owner != me and not _receives(topo, j, bucket, me):
                continue  # (never mapped here)
            span = spans[j]
            if span is not None:
                self.image.forget(*span)

    @staticmethod
    def _rounds(run: list[Bucket], crosses_raw: list[bool]) -> list[list[int]]:
        """The buckets in plan order, in rounds that cross nodes at once: consecutive buckets of
        distinct owners (the plan deals buckets to owners in turn, and the owners read the
        buckets of one round at the same time: were they sent one after another, the sends of
        the last round would all be left for after the last read). A bucket that crosses as
        read goes alone (its receiver converts it out of one staging buffer)."""
        rounds: list[list[int]] = []
        owners: set[int] = set()
        last_alone = False
        for j, bucket in enumerate(run):
            alone = crosses_raw[j]
            if not rounds or alone or last_alone or bucket.owner in owners:
                rounds.append([])
                owners = set()
            rounds[-1].append(j)
            owners.add(bucket.owner)
            last_alone = alone
        return rounds

    def _cross_nodes(self, ctx: Context, group: list[int], run: list[Bucket],
                     spans: list[tuple[int, int] | None], crosses_raw: list[bool],
                     as_read: dict[int, torch.Tensor]) -> None:
        """Each bucket of ``group`` goes from its reader to one rank of every other node
        (:func:`_receiver`), all of them at once: its bytes in the image, or as read
        (``as_read``; a reader that failed sends whatever its buffer holds, the failure is
        agreed on later), which the receiver converts into its node's image."""
        topo, me = ctx.topology, ctx.rank
        sends, recvs, staged = [], [], []
        for j in group:
            bucket = run[j]
            kept = as_read.pop(j, None)
            if crosses_raw[j] and (me != bucket.owner or kept is None):
                view = ctx.buffers.get("cross", bucket.nbytes)
            else:
                view = kept if crosses_raw[j] else self.image.data[spans[j][0]:spans[j][1]]
            for node in range(topo.num_nodes):
                if node == topo.node_of[bucket.owner]:
                    continue
                receiver = _receiver(topo, j, node)
                if me == bucket.owner:
                    sends.append((view, receiver))
                elif me == receiver:
                    recvs.append((view, bucket.owner))
                    if crosses_raw[j]:
                        staged.append((bucket, view))
        ctx.comm.exchange(sends, recvs)
        for bucket, view in staged:
            ctx.guard("distribute", self._convert_into_image, bucket, view)

    def _map(self, ctx: Context, run: list[Bucket]) -> None:
        ctx.dests = self.layout.tensors(self.image.private())
        ctx.fill_whole(run)


def _receives(topo: Topology, j: int, bucket: Bucket, rank: int) -> bool:
    """Whether ``rank`` receives the load's ``j``-th bucket from another node."""
    node = topo.node_of[rank]
    return topo.node_of[bucket.owner] != node and _receiver(topo, j, node) == rank


def _receiver(topo: Topology, j: int, node: int) -> int:
    """The rank of ``node`` that receives the load's ``j``-th bucket from another node: a
    different local rank for consecutive buckets, so that receiving is spread too."""
    local = topo.ranks_on(node)
    return local[j % len(local)]
