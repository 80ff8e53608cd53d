"""``distshard.load``: the one short function that joins planning, reading, collectives and
materialisation. Each phase ends in :meth:`Comm.agree`, so a failure anywhere stops every rank
at the same point, and the model is changed only after the last agreement."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import _faults
from .boxes import tiles, untiled
from .comm import Comm, failure_of
from .copies import digests, local_plan
from .errors import DistShardError
from .hfkeys import TransformersRules, keep_used, own_class
from .initialize import Initializer, initialize_missing
from .keys import converter, key_rules, log_keys, match_model
from .materialize import ModelTargets
from .options import DEFAULT_BUCKET_SIZE, DEFAULT_TIMEOUT, LoadOptions
from .plan import LoadPlan, make_plan
from .progress import JobProgress, progress_wanted
from .reader import ShardReader
from .record import paused_gc
from .report import LoadReport, PeakMemorySampler
from .routes.choose import maps_files, shares_node_copy
from .routes.exchange import Exchange
from .routes.image_layout import ImageLayout
from .shm import SHM_DIR, NodeImage
from .topology import Topology, node_key, node_name

__all__ = ["DEFAULT_BUCKET_SIZE", "LoadOptions", "load"]

logger = logging.getLogger("distshard")

@dataclass(frozen=True, slots=True)
class _Outcome:
    """What rank 0 decides and broadcasts: the plan and the key bookkeeping."""

    root: str
    plan: LoadPlan
    loaded_keys: tuple[str, ...]
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    token: str  # names this load's node images in shared memory, and its progress counter
    progress: bool  # whether rank 0 draws a progress bar (so the others count)
    initialized: tuple[str, ...] = ()  # one name per new tensor group, initialised on every rank
    initialized_keys: tuple[str, ...] = ()  # every name of those groups
    converted_keys: tuple[str, ...] = ()  # made by a conversion of whole checkpoint tensors
    seed: int = 0  # of the new tensors' initialisation
    used_conversions: list | None = None  # transformers' transforms the mapping used
    copies: tuple | None = None  # rank 0's node and file digests, for other nodes' copies


def load(
    model: torch.nn.Module,
    checkpoint: str | os.PathLike,
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    bucket_size: int = DEFAULT_BUCKET_SIZE,
    read_own_slices: bool = True,
    timeout: timedelta | float = DEFAULT_TIMEOUT,
    log_summary: bool = True,
    shared_memory: bool | None = None,
    map_checkpoint: bool = True,
    locality: str = "cluster",
    progress: bool | None = None,
    key_mapping: dict[str, str] | None = None,
) -> LoadReport:
    """Load ``checkpoint`` into ``model`` on every rank of ``group``, each byte read by one rank.

    Collective: every rank of ``group`` (default: the whole job; none needed for one process)
    calls it with the same arguments, and no other collective may run on ``group`` meanwhile.
    ``model`` may have parameters on meta (they land on ``device``: default the CPU for gloo,
    the current CUDA device for nccl) or on a real device (loaded in place). Floating tensors
    take the model's dtype, or ``dtype`` when given. DTensor parameters receive only their
    local shard: with ``read_own_slices``, a rank reads shards made of whole rows straight from
    the file; otherwise, and for other shards, the rank that read the file sends them.

    Any failure on any rank raises the same :class:`DistShardError` on every rank, and the model
    is then left unchanged; a rank that dies or stalls makes the others raise once ``timeout``
    passes without its answer (gloo; on nccl the group's own timeout applies).

    When every rank wants every tensor whole on the CPU (DDP-style replicas over gloo), the ranks
    of one node (see :mod:`distshard.topology`) share one copy of the tensors, and each rank's
    tensors are copy-on-write views of it (shared until the rank writes them). Where the node
    reads every byte itself (one node, or ``locality="node"``) from safetensors files and the
    tensors keep the checkpoint's dtypes, that copy is the page cache of the checkpoint files,
    which every rank maps (``map_checkpoint=True``, the default: as with transformers' loading,
    rewriting a checkpoint file in place, not by rename, changes what the tensors read until
    they are written); otherwise it is an image in ``/dev/shm``, written once per node, into
    which each byte is read once per job. ``shared_memory=None`` shares where it works and falls
    back to the backend's broadcast into each rank's own memory otherwise; ``True`` requires
    it; ``False`` never shares.

    ``locality="cluster"`` (default) reads every byte once per job and sends it to the nodes
    that need it; ``"node"`` has each node read the whole checkpoint once, shared among its own
    ranks, and sends nothing between nodes (for node-local disks or a slow interconnect).

    ``progress``: rank 0 draws one bar for the whole job (bytes read by all ranks, GB/s, ETA)
    on the ``distshard.progress`` logger; None does so when rank 0's stderr is a terminal and
    ``DISTSHARD_PROGRESS`` is not ``0`` (see :mod:`distshard.progress`).

    Keys: for a transformers model, the checkpoint's keys are mapped onto the model as
    transformers maps them (its conversions for the architecture: renamed layouts, one tensor
    per expert into fused experts, base-model prefixes added or stripped; see
    :mod:`distshard.hfkeys`), with ``key_mapping={regex: replacement}`` applied first as
    transformers' ``from_pretrained`` applies it; for any other module, ``key_mapping``'s
    patterns rename each checkpoint key in turn (``re.sub``, first match). A model key the
    checkpoint lacks but the model declares tied to one it has is read from that one. With
    ``strict=False``, model tensors the checkpoint does not hold are initialised as the model
    initialises them (a transformers model's ``_init_weights``, else ``reset_parameters``;
    for other modules only tensors on meta), identically on every rank, and listed in
    ``report.initialized_keys``; checkpoint tensors the model does not use are not read.
    """
    options = LoadOptions(device=device, dtype=dtype, strict=strict, bucket_size=bucket_size,
                          read_own_slices=read_own_slices, timeout=timeout,
                          log_summary=log_summary, shared_memory=shared_memory,
                          map_checkpoint=map_checkpoint, locality=locality, progress=progress,
                          key_mapping=key_mapping)
    comm = Comm(group, options.timeout)
    target_device = options.device or comm.device
    started = time.perf_counter()
    with PeakMemorySampler() as memory, paused_gc():  # see paused_gc: ~30 us per tensor
        try:
            targets, rules, outcome, topology = _plan(model, checkpoint, comm, options,
                                                      target_device)
            with JobProgress(sum(outcome.plan.bytes_per_rank()), rank=comm.rank,
                             key=outcome.token, store=_store(comm),
                             enabled=outcome.progress) as progress:
                dests, image, layout, mapped = _allocate(targets, outcome, topology, comm,
                                                         target_device, options)
                exchange = _distribute(targets, rules, outcome, dests, comm, options, image,
                                       layout, mapped, topology, progress)
                del image
                stats = _prepare_commit(targets, outcome, comm, exchange, memory, started,
                                        target_device)
        except Exception as e:
            # A failed load keeps nothing alive: the frames of its traceback would hold the
            # destinations (allocated tensors, mapped files, the node image) for as long as the
            # caller keeps the error, and an interactive session keeps the last one.
            dests = image = exchange = None  # noqa: F841 (this frame's own references)
            _clear_frames(e)
            if isinstance(e, DistShardError):
                raise
            raise DistShardError(  # a collective broke: a peer exited or the group timed out
                f"distshard: a collective failed on rank {comm.rank} ({type(e).__name__}: {e}); "
                f"another rank exited or did not answer within timeout={options.timeout}; "
                "see its log") from e
        targets.commit(exchange.dests, target_device)
        if outcome.used_conversions is not None:
            keep_used(model, outcome.used_conversions)
    report = LoadReport(
        rank=comm.rank, world_size=comm.world_size, loaded_keys=list(outcome.loaded_keys),
        missing_keys=list(outcome.missing_keys), unexpected_keys=list(outcome.unexpected_keys),
        files_read=exchange.reader.files_read, bytes_read=exchange.reader.bytes_read,
        bytes_read_per_rank=[s[0] for s in stats], total_bytes_read=sum(s[0] for s in stats),
        bytes_received=exchange.bytes_received, bytes_received_per_rank=[s[2] for s in stats],
        seconds=time.perf_counter() - started, peak_host_memory=memory.peak_above_baseline,
        peak_host_memory_per_rank=[s[1] for s in stats],
        seconds_per_rank=[s[3] / 1e6 for s in stats], node_of_rank=list(topology.node_of),
        shared_copy="files" if mapped else "shm" if layout is not None else None,
        initialized_keys=list(outcome.initialized_keys),
        converted_keys=list(outcome.converted_keys))
    if options.log_summary and comm.rank == 0:
        logger.info(report.summary())
        log_keys(report, own_class(model).__name__, outcome.root)
    return report


def _plan(model, checkpoint, comm: Comm, options: LoadOptions,
          device: torch.device) -> tuple[ModelTargets, object, _Outcome, Topology]:
    """Every rank inspects its model and names its node; rank 0 validates the checkpoint; all
    agree; rank 0 plans for the nodes found and sends the plan."""
    failure, targets, rules, found, outcome, signature = None, None, None, None, None, 0
    try:
        _faults.check("validate", comm.rank)
        targets = ModelTargets(model, options.dtype)
        signature = targets.signature()
        if comm.rank == 0:  # the other ranks need rules only to run a conversion (see _distribute)
            rules = key_rules(model, options.key_mapping, targets.modules)
            found = match_model(checkpoint, model, targets, rules, options.strict)
    except Exception as e:
        failure = failure_of(e, comm.rank, "validate")
    rows = comm.agree(failure, [signature, node_key(node_name())])
    signatures = [row[0] for row in rows]
    differ = [r for r, s in enumerate(signatures) if s != signatures[0]]
    if differ:
        raise DistShardError(
            f"distshard: the model on rank(s) {differ} differs from rank 0's (parameter names, "
            "shapes or dtypes); every rank must build the same model before calling load")
    topology = Topology.from_keys([row[1] for row in rows])
    if comm.rank == 0:
        root, match, initialized = found
        used = rules.used() if isinstance(rules, TransformersRules) else None
        readers = None
        if options.locality == "node":
            readers = [topology.ranks_on(n) for n in range(topology.num_nodes)]
        # (whether the ranks can share a node copy, not whether they must: shared_memory=True
        # where they cannot fails in _allocate, on every rank)
        images = topology.num_nodes > 1 and shares_node_copy(
            all_whole_on_cpu=targets.all_whole_on_cpu(), world_size=comm.world_size,
            group_device=comm.device, device=device,
            shared_memory=False if options.shared_memory is False else None)
        bucket_size = options.bucket_size_for(topology.num_nodes, images)
        plan = make_plan(match.files, comm.world_size, bucket_size, readers,
                         parts=match.parts, conversions=match.conversions, outputs=match.outputs)
        converted = sorted(n for c in match.conversions for t in c.targets
                           for n in targets.by_name[t].names)
        outcome = _Outcome(root, plan, match.loaded_keys, match.missing_keys,
                           match.unexpected_keys, secrets.token_hex(8),
                           progress_wanted(0) if options.progress is None else options.progress,
                           tuple(initialized),
                           tuple(sorted(n for k in initialized for n in targets.by_name[k].names)),
                           tuple(converted), torch.initial_seed(), used,
                           digests(root, plan, topology))
    outcome = comm.broadcast_object(outcome)
    if outcome.copies is None:  # one node: one copy of each file (the same on every rank)
        return targets, rules, outcome, topology
    failure, plan = None, outcome.plan
    try:  # this node's copy of each file is the one planned
        plan = local_plan(outcome.root, plan, outcome.copies, topology, comm.rank)
    except Exception as e:
        failure = failure_of(e, comm.rank, "validate")
    comm.agree(failure, [])
    return targets, rules, dataclasses.replace(outcome, plan=plan), topology


def _allocate(targets: ModelTargets, outcome: _Outcome, topology: Topology, comm: Comm,
              device: torch.device, options: LoadOptions
              ) -> tuple[dict[str, torch.Tensor], NodeImage | None, ImageLayout | None, bool]:
    """Allocate the destinations: none where every rank wants every tensor whole on the CPU and
    its node can map the checkpoint files (the last value: True); else this node's image of the
    tensors in shared memory, for those same loads; else each rank's own tensors. Agree that
    every rank of each node mapped the same image (else every rank goes without one)."""
    failure, dests, image, layout, problem, mapped = None, {}, None, None, None, False
    nonce = int(outcome.token, 16) >> 1
    try:
        _faults.check("plan", comm.rank)
        if shares_node_copy(all_whole_on_cpu=targets.all_whole_on_cpu(),
                            world_size=comm.world_size, group_device=comm.device,
                            device=device, shared_memory=options.shared_memory):
            specs = targets.whole_specs(outcome.plan)
            mapped = maps_files(outcome.plan, specs, topology,
                                map_checkpoint=options.map_checkpoint,
                                node_local=options.locality == "node")
            if not mapped:
                layout = ImageLayout.of(outcome.plan, specs)
                try:
                    node = topology.node_of[comm.rank]
                    image = NodeImage(outcome.token, node, layout.nbytes,
                                      len(topology.ranks_on(node)))
                    image.sign(topology.local_index(comm.rank), nonce)
                except OSError as e:
                    problem = (f"cannot place {layout.nbytes / 1e6:.1f} MB in {SHM_DIR} on rank "
                               f"{comm.rank}: {e}")
    except Exception as e:
        failure = failure_of(e, comm.rank, "plan")
    try:
        comm.agree(failure, [])
        if image is not None and not image.shared_by_all(nonce):
            problem = (f"rank {comm.rank} does not share {image.path} with the ranks named as "
                       f"its node's ({node_name()}); set DISTSHARD_NODE to tell nodes apart")
        ok = comm.agree(None, [problem is None, layout is not None or mapped])
    except BaseException:  # a rank failed or a peer is gone: nothing of the image is kept
        if image is not None:
            image.close()
        raise
    finally:
        if image is not None:
            image.unlink()
    if all(row == [True, True] for row in ok):
        return dests, image, layout, mapped
    if image is not None:
        image.close()
    if options.shared_memory and any(row[1] for row in ok):
        problems = [p for p in comm.all_gather_object(problem) if p is not None]
        problems = problems or ["the ranks disagree on whether every tensor is wanted whole"]
        raise DistShardError("distshard: shared_memory=True, but " + "; ".join(problems))
    if problem is not None:
        logger.warning("distshard: %s; exchanging through the backend instead", problem)
    failure = None
    try:
        dests = targets.allocate(outcome.plan, device)
    except Exception as e:
        failure = failure_of(e, comm.rank, "plan")
    comm.agree(failure, [])
    return dests, None, None, False


def _distribute(targets: ModelTargets, rules, outcome: _Outcome, dests, comm: Comm,
                options: LoadOptions, image: NodeImage | None, layout: ImageLayout | None,
                mapped: bool, topology: Topology, progress: JobProgress) -> Exchange:
    """Read and distribute every bucket; every rank then agrees on the outcome."""
    reader = None
    try:
        boxes = comm.all_gather_object(targets.boxes()) if targets.has_dtensors else None
        checked: dict = {}
        for key in boxes[0] if boxes else ():  # the same gathered boxes, the same answer everywhere
            shape = tuple(targets.by_name[key].tensor.shape)
            if not tiles(tuple(b[key] for b in boxes), shape, checked):
                raise DistShardError("distshard: " + untiled(key, shape), key=key)
        reader = ShardReader(outcome.root, outcome.plan, on_read=progress.advance,
                             convert=converter(rules or functools.partial(
                                 key_rules, targets.model, options.key_mapping, targets.modules),
                                 targets))
        exchange = Exchange(comm, outcome.plan, reader, dests, boxes,
                            read_own_slices=options.read_own_slices, image=image, layout=layout,
                            topology=topology, node_local=options.locality == "node",
                            mapped=mapped)
        failure = exchange.run()
        progress.flush()  # every rank's count is in before the last agreement
    finally:
        if reader is not None:
            reader.close()
        if image is not None:
            image.close()
    comm.agree(failure, [])
    return exchange


def _prepare_commit(targets: ModelTargets, outcome: _Outcome, comm: Comm, exchange: Exchange,
                    memory: PeakMemorySampler, started: float,
                    device: torch.device) -> list[list[int]]:
    failure = None
    try:
        _faults.check("materialize", comm.rank)
        if outcome.initialized:
            new, holes = initialize_missing(targets, outcome.initialized, outcome.seed, device,
                                            Initializer(targets.model))
            exchange.dests = {**(exchange.dests or {}), **new}
            if holes and comm.rank == 0:
                logger.warning(
                    "distshard: the model's initialisation does not write every element of %s "
                    "(transformers would leave whatever memory held there); those elements are "
                    "0 on every rank", holes)
        targets.check_complete(set(outcome.loaded_keys) | set(outcome.initialized_keys))
    except Exception as e:
        failure = failure_of(e, comm.rank, "materialize")
    micros = int((time.perf_counter() - started) * 1e6)
    return comm.agree(failure, [exchange.reader.bytes_read, memory.peak_above_baseline,
                                exchange.bytes_received, micros])


def _clear_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames in ``error``'s traceback and in those of
    its causes (the lines stay: the traceback prints the same)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _store(comm: Comm):
    """The job's c10d store, where the progress counter lives (None in one process)."""
    if not comm.distributed:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default store (a private API; progress then counts locally)
        return None
