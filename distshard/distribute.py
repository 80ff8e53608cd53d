"""Move each bucket from the rank that read it to the ranks that need it.

When every rank wants every tensor whole (plain tensors, replicated DTensors) on a CPU group,
each node's ranks share one image of the tensors: where the node reads every byte itself and
the tensors keep the checkpoint's dtypes, the checkpoint files' own page cache, which every rank
maps (see :meth:`Exchange._through_page_cache`); otherwise a file in shared memory (see
:meth:`Exchange._through_image`): each bucket is read once into its reader's node image and sent
once to every other node. Otherwise a bucket that every rank wants whole is broadcast by the
backend into each rank's own tensors. A bucket of DTensor shards made of whole rows, each row wanted by one rank, is read by every rank itself:
its own rows, straight into its shard. Any other bucket is cut by its reader into each rank's
pieces, sent point to point. No rank ever holds a full copy of a tensor it did not read.

Collective: every rank of the group runs :meth:`Exchange.run` over the same plan. A rank that
fails keeps joining every collective (with whatever bytes it has) and returns its failure, to be
raised by everyone at the next agreement.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _faults
from .comm import Comm, failure_of
from .errors import DistShardError, RankFailure
from .keymap import contiguous_start, region, volume
from .plan import Box, Bucket, LoadPlan, Piece, Slot, align, payload_layout
from .reader import ShardReader, map_files
from .shm import NodeImage
from .topology import Topology

__all__ = ["Exchange", "ImageLayout", "READERS"]

# Reads in flight per rank (node image, and own rows of sharded tensors). With one reader per
# rank this machine's disk gave 0.8-1.0 GB/s to 2 ranks; with two, 1.1-1.4 GB/s (replicated, 4
# ranks: 1.35 -> 0.9 s of reading; sharded, 4 ranks: 1.33-1.43 -> 1.20-1.23 s per load).
READERS = 2


class Exchange:
    def __init__(self, comm: Comm, plan: LoadPlan, reader: ShardReader,
                 dests: dict[str, torch.Tensor] | None, boxes: list[dict[str, Box]] | None,
                 *, read_own_slices: bool = True, image: NodeImage | None = None,
                 layout: ImageLayout | None = None, topology: Topology | None = None,
                 node_local: bool = False, mapped: bool = False) -> None:
        self.comm, self.plan, self.reader, self.dests = comm, plan, reader, dests
        self.read_own_slices = read_own_slices
        self.image, self.layout = image, layout
        self.mapped = mapped  # the node image is the checkpoint files' page cache
        self.topology = topology or Topology.single(comm.world_size)
        # Node-local loads: each node's ranks read their own copy of every bucket and serve
        # only each other; a rank skips the buckets of other nodes.
        self.node_local = node_local
        self.boxes = boxes or [{}] * comm.world_size  # per rank; empty: every tensor whole
        self.buffers = _Buffers(comm.device)
        self.failure: RankFailure | None = None
        self.bytes_received = 0  # from other ranks, through the collectives
        self._filled: dict[str, int] = {}  # elements written into each destination
        self._filled_lock = threading.Lock()
        self._ahead: _ReadAhead | None = None

    def run(self) -> RankFailure | None:
        steps = self._steps()
        # this rank's buckets that go through the backend, read ahead on a thread (see _ReadAhead)
        ahead = [b for kind, b, _ in steps if b.owner == self.comm.rank and (
            kind == "sliced" or (kind == "whole" and self.image is None and not self.mapped))]
        self._ahead = _ReadAhead(self, ahead) if ahead else None
        try:
            self._run_steps(steps)
        finally:
            if self._ahead is not None:
                self._ahead.close()
        self._guard("distribute", self._check_filled)
        return self.failure

    def _steps(self) -> list[tuple[str, Bucket, object]]:
        """Each bucket this rank takes part in, in plan order, with how it moves: ``whole``
        (every rank wants it whole), ``own`` (each rank reads its own rows; with its pieces) or
        ``sliced`` (cut by the reader and sent; with the wire bucket and every rank's layout)."""
        steps = []
        for bucket in self.plan.buckets:
            if self.comm.rank not in self._members(bucket):
                continue
            every = [payload_layout(bucket, b) for b in self.boxes]
            members = self._members(bucket)
            layouts = [lay if r in members else ((), 0) for r, lay in enumerate(every)]
            if all(p.box == p.slot.extent for pieces, _ in layouts for p in pieces):
                steps.append(("whole", bucket, None))
            elif self.image is not None or self.mapped:
                raise AssertionError("a node image holds only loads of whole tensors")
            elif self._each_reads_own(bucket, every):
                steps.append(("own", bucket, layouts[self.comm.rank][0]))
            else:
                wire = self._wire(bucket)
                if wire is not bucket:  # narrowed: the pieces are cut from the wire's layout
                    layouts = [payload_layout(wire, b) if r in members else ((), 0)
                               for r, b in enumerate(self.boxes)]
                steps.append(("sliced", bucket, (wire, layouts)))
        return steps

    def _run_steps(self, steps: list[tuple[str, Bucket, object]]) -> None:
        whole: list[Bucket] = []  # consecutive buckets every rank wants whole
        own: list[tuple[str, tuple[Piece, ...]]] = []  # pieces this rank reads itself, pending
        for kind, bucket, extra in steps:
            if kind == "whole":
                whole.append(bucket)
                continue
            self._replicate(whole)
            whole = []
            if kind == "own":
                own.append((bucket.file, extra))
            else:
                self._read_own_pieces(own)
                own = []
                self._send_slices(bucket, *extra)
        self._read_own_pieces(own)
        self._replicate(whole)

    def _replicate(self, run: list[Bucket]) -> None:
        if self.mapped:
            self._through_page_cache(run)
        elif self.image is not None:
            self._through_image(run)
        else:
            for bucket in run:
                self._broadcast(bucket)

    def _through_image(self, run: list[Bucket]) -> None:
        """Replicate ``run`` (every bucket of the load) through each node's image:

        1. :data:`READERS` threads read this rank's buckets straight into its node's image
           (several reads in flight: one stream rarely fills a disk), converting to the
           parameters' dtype on the way where they differ;
        2. meanwhile, in plan order, each bucket goes from its reader to one rank of every other
           node, which receives it into that node's image (point to point; nothing on one node):
           converted where that made it smaller, else as read, converted by the receiver (a
           reader keeps at most one such bucket read and not yet sent);
        3. one barrier; then every rank's tensors are views of its private mapping of the image.
        """
        me, topo = self.comm.rank, self.topology
        crossing = topo.num_nodes > 1 and not self.node_local
        mine = [j for j, bucket in enumerate(run) if bucket.owner == me]
        ready = {j: threading.Event() for j in mine}
        as_read: dict[int, torch.Tensor] = {}  # read, not yet sent: buckets that cross as read
        gates: dict[int, threading.Semaphore] = {}  # per reader: one such bucket at a time
        room: dict[int, threading.Semaphore] = {}  # each such bucket's reader's gate
        stop = threading.Event()  # a collective failed: readers leave their remaining buckets

        def read_one(reader: ShardReader, j: int) -> None:
            if stop.is_set():
                return
            keep = crossing and self._crosses_as_read(run[j])
            if keep:
                room[j] = gates.setdefault(id(reader), threading.Semaphore(1))
                room[j].acquire()  # released once its previous such bucket has been sent
                if stop.is_set():
                    return
            self._read_into_image(reader, run[j], as_read, j, keep)

        def read(reader: ShardReader, j: int) -> None:
            try:
                self._guard("read", read_one, reader, j)
            finally:
                ready[j].set()  # even if it failed: the bucket is sent (and the load fails)

        join = self._start_readers(mine, read)
        try:
            for j, bucket in enumerate(run):
                if bucket.owner == me:
                    ready[j].wait()  # sent in plan order, whichever thread read it
                else:
                    self.bytes_received += bucket.nbytes
                if crossing:
                    self._cross_nodes(j, bucket, as_read.pop(j, None))
                    if j in room:
                        room[j].release()
        except BaseException:  # a peer is gone: no reader may wait for a send that won't come
            stop.set()
            for gate in list(gates.values()):
                gate.release()
            join()
            raise
        join()
        self.comm.barrier()
        self._guard("distribute", self._map_image, run)

    def _through_page_cache(self, run: list[Bucket]) -> None:
        """Replicate ``run`` on a node that reads every byte itself, in the checkpoint's
        dtypes: the page cache of the checkpoint files is the node's image.

        1. :data:`READERS` threads bring this rank's buckets into the page cache
           (``MADV_POPULATE_READ``: read at the disk's pace, copied nowhere);
        2. one barrier; then every rank's tensors are views of its private (copy-on-write)
           mappings of the files: the node's one copy until the rank writes.
        """
        me = self.comm.rank
        self._start_readers([b for b in run if b.owner == me], lambda reader, bucket: self._guard(
            "read", reader.populate, bucket))()
        self.bytes_received += sum(b.nbytes for b in run if b.owner != me)  # through the node
        self.comm.barrier()
        self._guard("distribute", self._map_files, run)

    def _map_files(self, run: list[Bucket]) -> None:
        self.dests = map_files(self.reader.root, self.plan, run)
        for bucket in run:
            for slot in bucket.slots:
                self._fill(slot.key, slot.extent)

    def _read_into_image(self, reader: ShardReader, bucket: Bucket,
                         as_read: dict[int, torch.Tensor], j: int, keep: bool) -> None:
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
            src = staged[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
            self.layout.slot_view(self.image.data, s).copy_(src)

    def _crosses_as_read(self, bucket: Bucket) -> bool:
        """Whether the bucket crosses nodes as read, each receiving node putting it in its
        image: where it is not one run of the image (boxes of fused tensors), or is smaller as
        read than converted (its dtypes widen). The same on every rank."""
        run = self.layout.run(bucket)
        if run is None:
            return True
        return (any(s.dtype != self.layout.dtype[s.key] for s in bucket.slots)
                and bucket.nbytes < run[1] - run[0])

    def _cross_nodes(self, j: int, bucket: Bucket, as_read: torch.Tensor | None) -> None:
        """The bucket's reader sends it to one rank of every other node (a different local rank
        for consecutive buckets, so that receiving is spread too): its bytes in the image, or
        as read (``as_read``; a reader that failed sends whatever its buffer holds, the failure
        is agreed on later), which the receiver converts into its node's image."""
        topo, me = self.topology, self.comm.rank
        raw = self._crosses_as_read(bucket)
        if raw and (me != bucket.owner or as_read is None):
            view = self.buffers.get("cross", bucket.nbytes)
        else:
            view = as_read if raw else self.layout.bucket_bytes(self.image.data, bucket)
        sends, recvs = [], []
        for node in range(topo.num_nodes):
            if node == topo.node_of[bucket.owner]:
                continue
            local = topo.ranks_on(node)
            receiver = local[j % len(local)]
            if me == bucket.owner:
                sends.append((view, receiver))
            elif me == receiver:
                recvs.append((view, bucket.owner))
        self.comm.exchange(sends, recvs)
        if raw and recvs:
            self._guard("distribute", self._convert_into_image, bucket, view)

    def _map_image(self, run: list[Bucket]) -> None:
        private = self.image.private()
        self.dests = self.layout.tensors(private)
        for bucket in run:
            for slot in bucket.slots:
                self._fill(slot.key, slot.extent)

    def _members(self, bucket: Bucket) -> tuple[int, ...] | range:
        """The ranks a bucket serves: its reader's node when loading node-locally, else all."""
        if not self.node_local:
            return range(self.comm.world_size)
        return self.topology.ranks_on(self.topology.node_of[bucket.owner])

    def _fill(self, key: str, box) -> None:
        with self._filled_lock:  # reader threads fill pieces of one tensor side by side
            self._filled[key] = self._filled.get(key, 0) + volume(box[1])

    def _check_filled(self) -> None:
        """As many elements arrived for each destination as it holds: a plan that missed a row
        would otherwise hand back uninitialised memory."""
        for key, dest in (self.dests or {}).items():
            if self._filled.get(key, 0) != dest.numel():
                raise DistShardError(
                    f"internal error: {self._filled.get(key, 0)} of {dest.numel()} elements of "
                    f"{key!r} arrived; please report this", key=key)

    def _broadcast(self, bucket: Bucket) -> None:
        wire = self._wire(bucket)
        direct = self._direct_buffer(wire)
        buf = direct if direct is not None else self.buffers.get("bucket", wire.nbytes)
        buf = self._read(bucket, buf, wire, scratch=direct is None)
        members = self._members(bucket)
        if len(members) == self.comm.world_size:
            self.comm.broadcast(buf, bucket.owner)
        elif self.comm.rank == bucket.owner:  # one node of several: only to the node's ranks
            self.comm.exchange([(buf, r) for r in members if r != bucket.owner], [])
        else:
            self.comm.exchange([], [(buf, bucket.owner)])
        if bucket.owner != self.comm.rank:
            self.bytes_received += wire.nbytes
        if direct is None:
            self._unpack(wire.slots, [s.extent for s in wire.slots], buf, from_bucket=True)
        elif self.failure is None:
            self._fill(wire.slots[0].key, wire.slots[0].extent)
        self._done_with(bucket)

    def _wire(self, bucket: Bucket) -> Bucket:
        """``bucket`` as it travels between ranks: a floating tensor whose destination dtype is
        narrower than the file's goes in that dtype (converted once, by the reader, before it is
        sent: fewer bytes on the wire); any other as in the file, converted where it lands. The
        same on every rank (the model's dtypes are agreed)."""
        if not self.dests:
            return bucket
        slots, end = [], 0
        for s in bucket.slots:
            want = self.dests[s.key].dtype
            narrow = (s.dtype.is_floating_point and want.is_floating_point
                      and want.itemsize < s.dtype.itemsize)
            dtype = want if narrow else s.dtype
            offset = align(end)
            slots.append(dataclasses.replace(s, dtype=dtype, offset=offset,
                                             nbytes=volume(s.shape) * dtype.itemsize))
            end = offset + slots[-1].nbytes
        if all(w.dtype == s.dtype for w, s in zip(slots, bucket.slots)):
            return bucket
        return Bucket(bucket.owner, bucket.file, end, tuple(slots))

    def _send_slices(self, bucket: Bucket, wire: Bucket,
                     layouts: list[tuple[tuple[Piece, ...], int]]) -> None:
        """The owner sends each rank its pieces of the bucket (as it travels: ``wire``) point to
        point; ranks that need nothing of it take no part. A rank's single piece that is
        contiguous (whole rows) goes straight from the bucket, and lands straight in its
        destination; other payloads are packed. A rank uses one bucket buffer whether it sends
        or receives, plus the packed slices when it sends, plus what it reads ahead (see
        :class:`_ReadAhead`)."""
        me, owner = self.comm.rank, bucket.owner
        mine = layouts[me][0]
        if me == owner:
            full = self._read(bucket, self.buffers.get("bucket", wire.nbytes), wire, scratch=True)
            peers = [r for r, (_, n) in enumerate(layouts) if r != me and n > 0]
            sends, packed = [], []
            for r in peers:
                view = _single_contiguous(layouts[r][0], full)
                if view is not None:
                    sends.append((view, r))
                else:
                    packed.append(r)
            area = self.buffers.get("slices", sum(layouts[r][1] for r in packed))
            start = 0
            for r in packed:
                chunk = area[start:start + layouts[r][1]]
                start += layouts[r][1]
                self._guard("distribute", _pack, layouts[r][0], full, chunk)
                sends.append((chunk, r))
            self.comm.exchange(sends, [])
            self._unpack([p.slot for p in mine], [p.box for p in mine], full, from_bucket=True)
            self._done_with(bucket)
        elif layouts[me][1] > 0:
            direct = self._direct_piece(mine)
            received = direct if direct is not None else self.buffers.get("bucket", layouts[me][1])
            self.comm.exchange([], [(received, owner)])
            self.bytes_received += layouts[me][1]
            if direct is None:
                self._unpack([p.slot for p in mine], [p.box for p in mine], received,
                             offsets=[p.offset for p in mine])
            elif self.failure is None:
                self._fill(mine[0].slot.key, mine[0].box)

    def _each_reads_own(self, bucket: Bucket, layouts) -> bool:
        """Whether every rank can read its own pieces straight from the file: a safetensors
        bucket cut into whole rows, each byte wanted by exactly one rank. Then nothing crosses
        the network and storage still serves each byte once."""
        if (not self.read_own_slices or bucket.conversion is not None
                or self.plan.file(bucket.file).kind != "safetensors"):
            return False
        pieces = [p for ps, _ in layouts for p in ps]
        return (all(_start_in_slot(p) is not None for p in pieces)
                and sum(p.nbytes for p in pieces) == sum(s.nbytes for s in bucket.slots))

    def _read_own_pieces(self, batch: list[tuple[str, tuple[Piece, ...]]]) -> None:
        """Read this rank's own pieces of ``batch``'s buckets straight into its shards, by
        :data:`READERS` threads (no collective is involved)."""
        if len(batch) <= 1:
            for file, pieces in batch:
                self._guard("read", self._read_own, self.reader, file, pieces)
            return
        self._start_readers(batch, lambda reader, item: self._guard(
            "read", self._read_own, reader, *item))()

    def _start_readers(self, items: list, work: Callable[[ShardReader, object], None]
                       ) -> Callable[[], None]:
        """Run ``work(reader, item)`` for every item on :data:`READERS` threads, each with its
        own reader (its own open file), items dealt round robin; return the function that waits
        for them and counts their reads as this rank's. ``work`` must not raise (see _guard)."""
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

    def _read_own(self, reader: ShardReader, file: str, pieces: tuple[Piece, ...]) -> None:
        mine = self.boxes[self.comm.rank]
        for p in pieces:
            if p.nbytes == 0:
                continue
            slot = p.slot
            begin = slot.begin + _start_in_slot(p) * slot.dtype.itemsize
            origin = mine[slot.key][0] if slot.key in mine else None
            dest = self.dests[slot.key][region(p.box, origin)]
            if dest.dtype == slot.dtype and dest.device.type == "cpu" and dest.is_contiguous():
                reader.read_range(file, slot.key, begin, dest)
            else:  # a staging piece of its own: readers run in parallel
                tmp = torch.empty(p.nbytes, dtype=torch.uint8, pin_memory=dest.is_cuda)
                reader.read_range(file, slot.key, begin, tmp)
                dest.copy_(tmp.view(slot.dtype).view(p.box[1]))
            self._fill(slot.key, p.box)

    def _direct_piece(self, pieces: tuple[Piece, ...]) -> torch.Tensor | None:
        """The destination's own bytes for a payload of one piece that needs no conversion
        and is contiguous there (whole rows of a tensor or of a row-sharded local shard)."""
        if self.dests is None or len(pieces) != 1:
            return None
        p = pieces[0]
        dest = self.dests[p.slot.key]
        if dest.dtype != p.slot.dtype or dest.device != self.comm.device:
            return None
        mine = self.boxes[self.comm.rank]
        origin = mine[p.slot.key][0] if p.slot.key in mine else None
        return _flat(dest[region(p.box, origin)])

    def _read(self, bucket: Bucket, buf: torch.Tensor, wire: Bucket | None = None, *,
              scratch: bool = False) -> torch.Tensor:
        """On the owner, ``bucket`` laid out as ``wire`` (default: as read) in ``buf``, or, where
        ``buf`` is only scratch space, in the buffer it was read ahead into; return that
        buffer. Other ranks get ``buf`` back."""
        if bucket.owner != self.comm.rank:
            return buf
        ahead = self._ahead.take(bucket) if self._ahead is not None else None
        narrowed = wire is not None and wire is not bucket
        if ahead is not None:
            if not narrowed and scratch and ahead.device == buf.device:
                return ahead  # sent straight from where it was read
            src = ahead
            if narrowed and ahead.device != buf.device:
                src = self.buffers.get("raw", bucket.nbytes)
                self._guard("distribute", src.copy_, ahead)
            if narrowed:
                self._guard("distribute", _convert, bucket, src, wire, buf)
            else:
                self._guard("distribute", buf.copy_, ahead)
            return buf
        if not narrowed:
            self._guard("read", self.buffers.read_into, self.reader, bucket, buf)
            return buf
        raw = self.buffers.get("raw", bucket.nbytes)
        self._guard("read", self.buffers.read_into, self.reader, bucket, raw)
        self._guard("distribute", _convert, bucket, raw, wire, buf)
        return buf

    def _done_with(self, bucket: Bucket) -> None:
        """The owner has sent ``bucket``: its read-ahead buffer may take the next one."""
        if bucket.owner == self.comm.rank and self._ahead is not None:
            self._ahead.release(bucket)

    def _unpack(self, slots, boxes, buf: torch.Tensor, *, from_bucket: bool = False,
                offsets: list[int] | None = None) -> None:
        """Copy (and convert) box ``boxes[i]`` of ``slots[i]`` into its destination; the data
        sits in ``buf`` at the slot's place in the bucket (``from_bucket``) or packed at
        ``offsets``."""
        self._guard("distribute", self._unpack_now, slots, boxes, buf, from_bucket, offsets)

    def _unpack_now(self, slots, boxes, buf, from_bucket, offsets) -> None:
        mine = self.boxes[self.comm.rank]
        for i, (slot, box) in enumerate(zip(slots, boxes)):
            if from_bucket:
                held = buf[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
                src = held[region(box, slot.extent[0])]
            else:
                nbytes = volume(box[1]) * slot.dtype.itemsize
                src = buf[offsets[i]:offsets[i] + nbytes].view(slot.dtype).view(box[1])
            origin = mine[slot.key][0] if slot.key in mine else None
            self.dests[slot.key][region(box, origin)].copy_(src)
            self._fill(slot.key, box)

    def _guard(self, phase: str, fn, *args) -> None:
        """Run a local step unless this rank already failed; record its failure. Never raises,
        so the collectives that follow still happen."""
        if self.failure is not None:
            return
        try:
            _faults.check(phase, self.comm.rank)
            fn(*args)
        except Exception as e:
            self.failure = failure_of(e, self.comm.rank, phase)

    def _direct_buffer(self, bucket: Bucket) -> torch.Tensor | None:
        """The destination's own bytes, when a bucket is one tensor (or rows of one) that needs
        no conversion: it is then read or received in place, with no staging copy. The rows
        are found in the destination by where it starts: a local shard starts at its offset."""
        if self.dests is None or len(bucket.slots) != 1:
            return None
        slot = bucket.slots[0]
        dest = self.dests[slot.key]
        if dest.dtype != slot.dtype or dest.device != self.comm.device or slot.nbytes == 0:
            return None
        mine = self.boxes[self.comm.rank]
        origin = mine[slot.key][0] if slot.key in mine else None
        return _flat(dest[region(slot.extent, origin)])


def _convert(bucket: Bucket, raw: torch.Tensor, wire: Bucket, buf: torch.Tensor) -> None:
    """Each slot of ``bucket`` in ``raw``, converted into its place and dtype in ``wire``."""
    for s, w in zip(bucket.slots, wire.slots):
        src = raw[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        buf[w.offset:w.offset + w.nbytes].view(w.dtype).view(w.shape).copy_(src)


def _file_order(bucket: Bucket) -> tuple:
    first = bucket.slots[0]
    return bucket.file, first.begin or 0, first.key, first.first


def _single_contiguous(pieces: tuple[Piece, ...], full: torch.Tensor) -> torch.Tensor | None:
    """The bucket's own bytes for a payload of one piece that is contiguous in it."""
    if len(pieces) != 1:
        return None
    slot, box = pieces[0].slot, pieces[0].box
    held = full[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
    return _flat(held[region(box, slot.extent[0])])


def _start_in_slot(p: Piece) -> int | None:
    """Where the piece starts among its slot's elements, when it is a contiguous run of them
    (then it is a byte range of the file); None otherwise."""
    if p.nbytes == 0:
        return 0
    at = p.slot.extent[0]
    return contiguous_start((tuple(o - a for o, a in zip(p.box[0], at)), p.box[1]), p.slot.shape)


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    return t.reshape(-1).view(torch.uint8) if t.is_contiguous() and t.numel() > 0 else None


def _pack(pieces: tuple[Piece, ...], full: torch.Tensor, chunk: torch.Tensor) -> None:
    """Cut each piece's box out of the whole bucket ``full`` into ``chunk``."""
    for p in pieces:
        slot = p.slot
        held = full[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
        part = held[region(p.box, slot.extent[0])]
        chunk[p.offset:p.offset + p.nbytes].view(slot.dtype).view(p.box[1]).copy_(part)


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Where each whole tensor lies in a node image, in the parameter's dtype. Same on every
    rank."""

    offset: dict[str, int]
    dtype: dict[str, torch.dtype]
    shape: dict[str, tuple[int, ...]]
    nbytes: int

    @classmethod
    def of(cls, plan: LoadPlan, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> ImageLayout:
        """Lay the tensors out in file order: a bucket of whole tensors, or of rows of one
        tensor, is then one run of bytes (:meth:`run`); buckets of boxes of fused tensors may
        not be."""
        offset, end = {}, 0
        for bucket in sorted(plan.buckets, key=_file_order):
            for slot in bucket.slots:
                if slot.key not in offset:
                    dtype, shape = specs[slot.key]
                    offset[slot.key] = align(end)
                    end = offset[slot.key] + volume(shape) * dtype.itemsize
        layout = cls(offset, {k: specs[k][0] for k in offset}, {k: specs[k][1] for k in offset},
                     end)
        layout._check_runs(plan)
        return layout

    def _check_runs(self, plan: LoadPlan) -> None:
        """Each bucket's run of bytes holds its own slots only: what crosses nodes is the run.
        (A node-local plan holds each bucket once per node: the same run.)"""
        runs = sorted({r for r in map(self.run, plan.buckets) if r is not None})
        if any(a[1] > b[0] for a, b in zip(runs, runs[1:])):
            raise AssertionError("internal error: buckets overlap in the node image")

    def _slot_range(self, slot: Slot) -> tuple[int, int] | None:
        """The image bytes of the slot's box, when the box is contiguous in its tensor."""
        start = contiguous_start(slot.extent, self.shape[slot.key])
        if start is None:
            return None
        size = self.dtype[slot.key].itemsize
        begin = self.offset[slot.key] + start * size
        return begin, begin + volume(slot.shape) * size

    def contiguous(self, slot: Slot) -> bool:
        """Whether the slot's box is one run of bytes in the image."""
        return self._slot_range(slot) is not None

    def _tensor_end(self, key: str) -> int:
        return self.offset[key] + volume(self.shape[key]) * self.dtype[key].itemsize

    def run(self, bucket: Bucket) -> tuple[int, int] | None:
        """The bucket's slots as one run of image bytes: each slot contiguous, each next one
        right after the last (or, in another tensor, after the alignment between two whole
        tensors); None otherwise."""
        ranges = [self._slot_range(s) for s in bucket.slots]
        if any(r is None for r in ranges):
            return None
        for s, t, (_, a1), (b0, _) in zip(bucket.slots, bucket.slots[1:], ranges, ranges[1:]):
            if s.key == t.key:
                if b0 != a1:
                    return None
            elif not (a1 == self._tensor_end(s.key) and b0 == self.offset[t.key] == align(a1)):
                return None
        return ranges[0][0], ranges[-1][1]

    def slot_bytes(self, data: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The bytes of ``slot``'s box, in the parameter's dtype (a box contiguous in its
        tensor: see :meth:`slot_view` for any)."""
        begin, end = self._slot_range(slot)
        return data[begin:end]

    def slot_view(self, data: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The slot's box of its tensor in the image, typed (strided where the box is)."""
        return self.tensor(data, slot.key)[region(slot.extent, None)]

    def bucket_bytes(self, data: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """The bucket's :meth:`run` of bytes."""
        begin, end = self.run(bucket)
        return data[begin:end]

    def tensor(self, data: torch.Tensor, key: str) -> torch.Tensor:
        o = self.offset[key]
        return data[o:self._tensor_end(key)].view(self.dtype[key]).view(self.shape[key])

    def tensors(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self.tensor(data, k) for k in self.offset}


class _ReadAhead:
    """Reads this rank's buckets that go through the backend ahead, in plan order, on one
    thread, into one host buffer: as soon as the rank has sent its bucket, its next one is read
    while the collectives of the buckets between them (other ranks', in the plan's interleaved
    order) go on. One bucket of staging; the thread is at most one bucket ahead."""

    def __init__(self, exchange: Exchange, buckets: list[Bucket]) -> None:
        self._exchange, self._buckets = exchange, buckets
        self._index = {id(b): i for i, b in enumerate(buckets)}
        self._ready = [threading.Event() for _ in buckets]
        self._held: list[torch.Tensor | None] = [None] * len(buckets)
        self._free = threading.Semaphore(1)
        self._stop = False
        pin = exchange.comm.device.type == "cuda"
        size = max(b.nbytes for b in buckets)
        self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        self._reader = exchange.reader.clone()
        self._thread = threading.Thread(target=self._run, daemon=True, name="distshard-ahead")
        self._thread.start()

    def _run(self) -> None:
        try:
            for i, bucket in enumerate(self._buckets):
                self._free.acquire()
                if self._stop:
                    return
                held = self._buffer[:bucket.nbytes]
                self._exchange._guard("read", self._reader.read, bucket, held)
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
        if id(bucket) in self._index:
            self._free.release()

    def close(self) -> None:
        self._stop = True
        self._free.release()
        self._thread.join()
        self._exchange.reader.absorb(self._reader)


class _Buffers:
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
