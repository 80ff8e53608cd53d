"""Which route each bucket takes: pure functions of the plan, each rank's boxes, the model's
dtypes and the nodes; the same answer on every rank (their inputs are agreed). Tested without
processes.

A bucket every member rank wants whole is *replicated*, by the load's one replication route:
``page_cache`` or ``node_image`` where the ranks of a node share one copy
(:func:`shares_node_copy`, :func:`maps_files`), else ``broadcast``. A bucket of DTensor shards
goes by ``own_rows`` where every rank can read its own rows (:func:`each_reads_own`), else by
``slices``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..keymap import volume
from ..plan import Box, Bucket, LoadPlan, align, payload_layout
from ..topology import Topology
from .own_rows import each_reads_own
from .shared import Step

__all__ = ["REPLICATION", "choose", "maps_files", "shares_node_copy", "wire_of"]

REPLICATION = ("page_cache", "node_image", "broadcast")


def choose(plan: LoadPlan, boxes: list[Mapping[str, Box]], rank: int, *, replication: str,
           topology: Topology, node_local: bool = False, read_own_slices: bool = True,
           dests: Mapping[str, torch.Tensor] | None = None) -> list[Step]:
    """Each bucket rank ``rank`` takes part in, in plan order, with its route. ``boxes``: every
    rank's boxes (empty: every tensor whole); ``replication``: how whole buckets move (one of
    :data:`REPLICATION`); ``dests``: the destinations (their dtypes decide what travels
    narrowed, see :func:`wire_of`)."""
    if replication not in REPLICATION:
        raise ValueError(f"replication must be one of {REPLICATION}, got {replication!r}")
    world, whole = len(boxes), not any(boxes)  # whole: every rank wants every tensor whole
    steps = []
    for bucket in plan.buckets:
        members = (topology.ranks_on(topology.node_of[bucket.owner]) if node_local
                   else range(world))
        if rank not in members:
            continue
        if whole:
            steps.append(Step(replication, bucket))
            continue
        cache: dict[int, tuple] = {}  # ranks with the very same boxes get the same layout
        every = [cache[id(b)] if id(b) in cache else cache.setdefault(
            id(b), payload_layout(bucket, b)) for b in boxes]
        layouts = [lay if r in members else ((), 0) for r, lay in enumerate(every)]
        if all(p.box == p.slot.extent for pieces, _ in layouts for p in pieces):
            steps.append(Step(replication, bucket))
        elif replication != "broadcast":
            raise AssertionError("a node's shared copy holds only loads of whole tensors")
        elif read_own_slices and each_reads_own(plan, bucket, every):
            steps.append(Step("own_rows", bucket, pieces=layouts[rank][0]))
        else:
            wire = wire_of(bucket, dests)
            if wire is not bucket:  # narrowed: the pieces are cut from the wire's layout
                layouts = [payload_layout(wire, b) if r in members else ((), 0)
                           for r, b in enumerate(boxes)]
            steps.append(Step("slices", bucket, wire=wire, layouts=tuple(layouts)))
    return steps


def wire_of(bucket: Bucket, dests: Mapping[str, torch.Tensor] | None) -> Bucket:
    """``bucket`` as it travels between ranks: a floating tensor whose destination dtype is
    narrower than the file's goes in that dtype (converted once, by the reader, before it is
    sent: fewer bytes on the wire); any other as in the file, converted where it lands. The
    same on every rank (the model's dtypes are agreed)."""
    if not dests:
        return bucket
    slots, end = [], 0
    for s in bucket.slots:
        want = dests[s.key].dtype
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


def shares_node_copy(*, all_whole_on_cpu: bool, world_size: int, group_device: torch.device,
                     device: torch.device, shared_memory: bool | None) -> bool:
    """Whether the ranks of a node may share one copy of the tensors (``page_cache`` or
    ``node_image``): every rank wants every tensor whole, on the CPU, over a CPU group."""
    if shared_memory is False or world_size == 1:
        return False
    if group_device.type != "cpu" or device.type != "cpu":
        if shared_memory:
            raise ValueError("shared_memory=True needs a CPU process group (gloo) and device")
        return False
    return all_whole_on_cpu


def maps_files(plan: LoadPlan, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
               topology: Topology, *, map_checkpoint: bool, node_local: bool) -> bool:
    """Whether a node's shared copy can be the page cache of the checkpoint files: the node
    reads every byte itself (one node, or node-local loads), from safetensors files, and every
    tensor is one run of one checkpoint tensor, in its dtype, at an offset aligned for it (a
    view needs all three)."""
    if not plan.identity or not map_checkpoint or (topology.num_nodes > 1 and not node_local):
        return False
    return all(plan.file(b.file).kind == "safetensors"
               and all(specs[s.key][0] == s.dtype and s.begin % s.dtype.itemsize == 0
                       for s in b.slots)
               for b in plan.buckets)
