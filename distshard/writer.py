"""``distshard.save``: write a model's parameters and persistent buffers across a job as a
Hugging Face safetensors checkpoint, each file written by one rank, in parallel (the file format
and whole-file writes are in ``shardfiles.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import _faults
from .boxes import tiles, untiled
from .comm import Comm, failure_of
from .errors import DistShardError
from .index import SAFE_INDEX, SAFE_SINGLE
from .loader import DEFAULT_TIMEOUT
from .materialize import box_of
from .savelayout import Saved, SavePiece, assemble, hub_layout, local_box, pieces_of
from .shardfiles import (
    ShardLayout,
    TensorLayout,
    assign_writers,
    fsync_dir,
    nbytes_of,
    new_token,
    parse_size,
    plan_shards,
    remove_if_present,
    remove_temporaries,
    stage_index,
    temp_name,
    tensor_bytes,
    write_all,
    write_file,
)

__all__ = ["SaveReport", "save"]

logger = logging.getLogger("distshard")


@dataclass(frozen=True, slots=True)
class SavePlan:
    """What rank 0 decides and broadcasts: the files, who writes each, what each saved tensor
    is made of, and where every piece of it comes from."""

    layouts: tuple[ShardLayout, ...]
    writers: tuple[int, ...]
    saved: dict[str, Saved]
    pieces: dict[str, tuple[SavePiece, ...]]
    token: str  # names this save's temporary files

    def files_of(self, rank: int) -> list[int]:
        return [i for i, w in enumerate(self.writers) if w == rank]


@dataclass(kw_only=True, slots=True)
class SaveReport:
    """Returned by :func:`save` on every rank."""

    rank: int
    world_size: int
    directory: str
    files: list[str]  # every file of the checkpoint, index last when there is one
    files_written: list[str]  # the shards this rank wrote
    bytes_written: int
    bytes_written_per_rank: list[int]
    bytes_sent: int  # DTensor pieces sent to other ranks' writers
    bytes_received: int
    peak_staging_bytes: int  # most bytes of received pieces plus one assembled tensor at once
    total_size: int
    seconds: float


def save(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    group: dist.ProcessGroup | None = None,
    timeout: timedelta | float = DEFAULT_TIMEOUT,
    layout: str = "hub",
) -> SaveReport:
    """Save the parameters and persistent buffers of ``model`` as a Hugging Face safetensors
    checkpoint in ``directory``, each file written by one rank, in parallel.

    Collective: every rank of ``group`` (default: the whole job; none needed for one process)
    calls it with the same arguments and the same model, in the same order as its other
    collectives. ``directory`` must be on storage every rank sees. Plain tensors are taken as
    replicated: the writer of their file writes its own copy. A DTensor (FSDP2, tensor parallel)
    is assembled on its file's writer alone, from one copy of each distinct local shard; a writer
    holds the pieces of one file at a time. Tied weights are written once, under the name
    transformers keeps. A transformers model's config is written beside the weights.

    ``layout="hub"`` (default) writes a transformers model as its ``save_pretrained`` does
    (transformers' conversions reverted: fused experts as one tensor per expert, the
    checkpoint's own names), so that transformers and every other reader of that layout load
    the files; each saved tensor is gathered from just the boxes of the model tensors it holds
    (see :mod:`distshard.savelayout`). ``layout="model"`` writes the model's own tensors. Any
    other module is written as its own tensors either way.

    Files appear only whole (temporary name, fsync, rename), and the index last, after every
    rank agreed. Any failure raises the same :class:`DistShardError` on every rank and leaves no
    temporary file of this save; one before the renames (writing, checking, staging the config
    and the index) leaves an earlier checkpoint in ``directory`` as it was.
    """
    limit = parse_size(max_shard_size)
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be a positive timedelta or seconds, got {timeout!r}")
    if layout not in ("hub", "model"):
        raise ValueError(f"layout must be 'hub' or 'model', got {layout!r}")
    comm = Comm(group, timeout, action="save")
    directory = os.path.abspath(os.fspath(directory))
    started = time.perf_counter()
    plan = None
    try:
        tensors, plan = _plan(model, directory, limit, comm, layout)
        stats, written = _write(model, tensors, plan, directory, comm)
        _commit(model, plan, directory, written, comm)
    except DistShardError:
        _clean(directory, plan)
        raise
    except Exception as e:  # a collective broke: a peer exited or the group timed out
        _clean(directory, plan)
        raise DistShardError(
            f"distshard: a collective failed on rank {comm.rank} during save ({type(e).__name__}: "
            f"{e}); another rank exited or did not answer within timeout={timeout}") from e
    names = [s.name for s in plan.layouts] + ([SAFE_INDEX] if len(plan.layouts) > 1 else [])
    mine = stats[comm.rank]
    report = SaveReport(
        rank=comm.rank, world_size=comm.world_size, directory=directory, files=names,
        files_written=[plan.layouts[i].name for i in plan.files_of(comm.rank)],
        bytes_written=mine[0], bytes_written_per_rank=[s[0] for s in stats], bytes_sent=mine[1],
        bytes_received=mine[2], peak_staging_bytes=mine[3],
        total_size=sum(s.nbytes for s in plan.layouts), seconds=time.perf_counter() - started)
    if comm.rank == 0:
        logger.info("distshard: saved %d tensors in %d file(s), %d bytes, from %d rank(s) in "
                    "%.2f s to %s", sum(len(s.tensors) for s in plan.layouts), len(plan.layouts),
                    report.total_size, comm.world_size, report.seconds, directory)
    return report


def _clean(directory: str, plan: SavePlan | None) -> None:
    if plan is not None:
        remove_temporaries(directory, plan.token)


def _plan(model: torch.nn.Module, directory: str, limit: int, comm: Comm,
          layout: str) -> tuple[dict[str, torch.Tensor], SavePlan]:
    """Every rank lists what it saves and its DTensor boxes; rank 0 plans and makes the folder;
    all agree, then rank 0's plan is broadcast."""
    failure, tensors, signature, boxes = None, {}, 0, {}
    try:
        tensors = tensors_to_save(model)
        text = "\n".join(f"{k}:{t.dtype}:{list(t.shape)}:{isinstance(t, DTensor)}"
                         for k, t in tensors.items())
        signature = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
        known: dict = {}  # (one computation per shape, mesh and placements)
        boxes = {k: box_of(t, k, known) for k, t in tensors.items() if isinstance(t, DTensor)}
    except Exception as e:
        failure = failure_of(e, comm.rank, "validate")
    rows = comm.agree(failure, [signature, int(bool(boxes))])
    differ = [r for r, row in enumerate(rows) if row[0] != rows[0][0]]
    if differ:
        raise DistShardError(
            f"distshard: the model on rank(s) {differ} differs from rank 0's (names, shapes, "
            "dtypes or sharding of what it saves); every rank must call save with the same model")
    all_boxes = comm.all_gather_object(boxes) if any(row[1] for row in rows) else None
    plan, failure = None, None
    if comm.rank == 0:
        try:
            plan = _make_plan(model, tensors, all_boxes, limit, comm.world_size, layout)
            os.makedirs(directory, exist_ok=True)
        except Exception as e:
            failure = failure_of(e, comm.rank, "plan")
    comm.agree(failure, [])
    return tensors, comm.broadcast_object(plan)


def tensors_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state_dict name, in state_dict order, one name per
    tensor object: of tied names, the first that transformers does not list as a tied copy
    (``_tied_weights_keys``), else the first."""
    state = model.state_dict(keep_vars=True)
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    names_of: dict[int, list[str]] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and name not in ignored:
            names_of.setdefault(id(value), []).append(name)
    kept, copies = set(), None
    for names in names_of.values():
        if len(names) > 1:  # (a tensor of one name keeps it: no pattern asked)
            copies = _tied_copies(model) if copies is None else copies
            names = [n for n in names if not any(_matches(p, n) for p in copies)] or names
        kept.add(names[0])
    out = {name: value for name, value in state.items() if name in kept}
    meta = [name for name, value in out.items() if value.device.type == "meta"]
    if meta:
        raise DistShardError(f"{len(meta)} tensor(s) are on the meta device, with nothing to "
                             f"save: {', '.join(meta)}; load or initialise the model first",
                             key=meta[0])
    for name, value in out.items():
        if isinstance(value, DTensor) and any(p.is_partial() for p in value.placements):
            raise DistShardError(f"key {name!r} is a DTensor with a Partial placement; reduce it "
                                 "(redistribute to Replicate or Shard) before saving", key=name)
    return {name: value.detach() for name, value in out.items()}


def _tied_copies(model: torch.nn.Module) -> list[str]:
    """The names (patterns) transformers drops from tied groups on save: the keys of every
    submodule's ``_tied_weights_keys`` (a dict target -> source; a list in older versions)."""
    out = []
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None) or ()
        out += [f"{prefix}.{k}" if prefix else k for k in tied]
    return out


def _matches(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return pattern == name


def _make_plan(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
               all_boxes: list[dict] | None, limit: int, world_size: int,
               layout: str) -> SavePlan:
    sharded = set(all_boxes[0]) if all_boxes else set()
    checked: dict = {}
    for key in sharded:
        _check_boxes(key, tuple(tensors[key].shape), [b.get(key) for b in all_boxes], checked)
    saved = hub_layout(model if layout == "hub" else None, tensors)
    layouts = plan_shards(((s.key, s.dtype, s.shape) for s in saved), limit)
    writers = assign_writers([s.size for s in layouts], world_size)
    writer_of = {t.key: writers[i] for i, s in enumerate(layouts) for t in s.tensors}
    pieces = {s.key: pieces_of(s, all_boxes, writer_of[s.key], sharded) for s in saved}
    by_key = {s.key: s for s in saved}
    for shard in layouts:  # in write order: a reverted conversion's pieces go to a file once
        made: set[int] = set()
        for t in shard.tensors:
            group = by_key[t.key].group
            if group in made:
                pieces[t.key] = ()  # made with the group's first tensor in this file
            elif group is not None:
                made.add(group)
    return SavePlan(tuple(layouts), tuple(writers), by_key, pieces, new_token())


def _check_boxes(key: str, shape: tuple[int, ...], boxes: list, checked: dict) -> None:
    """Every rank holds a box of DTensor ``key``, and the distinct boxes cover it exactly
    (``checked``: see :func:`~distshard.boxes.tiles`)."""
    for rank, box in enumerate(boxes):
        if box is None:
            raise DistShardError(f"key {key!r} is a DTensor on rank 0 but not on rank {rank}",
                                 key=key)
    if not tiles(tuple(b for b in boxes if nbytes_of(torch.uint8, b[1])), shape, checked):
        raise DistShardError(untiled(key, shape), key=key)


def _write(model: torch.nn.Module, tensors: dict[str, torch.Tensor], plan: SavePlan,
           directory: str, comm: Comm) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """In rounds, each rank writes its next file: one exchange sends every piece of the round's
    files to their writers, then all writers write at once. A rank that failed keeps taking
    part in the exchanges; all agree at the end."""
    failure, written = None, []
    bytes_written = bytes_sent = bytes_received = peak = 0
    files_by_rank = [plan.files_of(r) for r in range(comm.world_size)]
    for step in range(max(len(f) for f in files_by_rank)):
        sends, recvs, received = [], [], {}
        for i in (files[step] for files in files_by_rank if step < len(files)):
            writer = plan.writers[i]
            for t in plan.layouts[i].tensors:
                for piece in plan.pieces[t.key]:
                    if piece.src == writer:
                        continue
                    if piece.src == comm.rank:
                        sends.append((local_box(tensors[piece.key], piece.box), writer))
                    elif writer == comm.rank:
                        buf = torch.empty(piece.box[1], dtype=tensors[piece.key].dtype,
                                          device=comm.device)
                        recvs.append((buf, piece.src))
                        received[t.key, piece] = buf
        comm.exchange(sends, recvs)
        bytes_sent += sum(s.nbytes for s, _ in sends)
        staged = sum(b.nbytes for b in received.values())
        bytes_received += staged
        mine = files_by_rank[comm.rank]
        if step >= len(mine) or failure is not None:
            continue
        layout = plan.layouts[mine[step]]
        groups: dict[int, dict[str, torch.Tensor]] = {}  # reverted conversions of this file

        def fill(fd: int, t: TensorLayout) -> None:
            nonlocal peak
            value = assemble(model, tensors, plan.saved[t.key], plan.pieces[t.key], received,
                             comm.rank, groups)
            peak = max(peak, staged + value.nbytes)
            write_all(fd, tensor_bytes(value))

        try:
            _faults.check("write", comm.rank)
            written.append((layout.name, write_file(directory, layout, plan.token, fill)))
            bytes_written += layout.size
        except Exception as e:
            failure = failure_of(DistShardError(
                f"cannot write {layout.name!r} in {directory!r}: {type(e).__name__}: {e}",
                file=layout.name), comm.rank, "write")
    return comm.agree(failure, [bytes_written, bytes_sent, bytes_received, peak]), written


def _commit(model: torch.nn.Module, plan: SavePlan, directory: str,
            written: list[tuple[str, str]], comm: Comm) -> None:
    """What can fail is done before anything of an older save is touched: rank 0 checks that it
    sees every rank's finished file (storage every rank shares) and writes the config and the
    index under temporary names, and only then removes an old index (so none names a mix of
    files). Then renames only: every writer renames its files into place; rank 0 renames the
    config and the index (last), and removes shards of an older save that the new one does not
    have. Each step is agreed."""
    staged: list[tuple[str, str]] = []

    def stage() -> None:
        if comm.rank == 0:
            staged.extend(_stage(model, plan, directory))
            remove_if_present(os.path.join(directory, SAFE_INDEX))

    def place_own() -> None:
        for name, temp in written:
            os.replace(temp, os.path.join(directory, name))
        if written:
            fsync_dir(directory)

    def place_rest() -> None:
        if comm.rank == 0:
            _place(staged, plan, directory)

    for step in (stage, place_own, place_rest):
        failure = None
        try:
            step()
        except Exception as e:
            failure = failure_of(e, comm.rank, "commit")
        comm.agree(failure, [])


def _stage(model: torch.nn.Module, plan: SavePlan, directory: str) -> list[tuple[str, str]]:
    """Check every file of the save under its temporary name; write the config files and the
    index under theirs. Returns (name, temporary path) of each, the index last."""
    for layout, writer in zip(plan.layouts, plan.writers):
        path = os.path.join(directory, temp_name(layout.name, plan.token))
        size = os.stat(path).st_size if os.path.exists(path) else None
        if size != layout.size:
            raise DistShardError(
                f"file {layout.name!r} written by rank {writer} is {size} bytes on rank 0, "
                f"expected {layout.size}: {directory!r} must be storage every rank shares",
                file=layout.name)
    folder = os.path.join(directory, temp_name("config", plan.token))  # removed with the rest
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if callable(getattr(config, "save_pretrained", None)):
            os.makedirs(folder, exist_ok=True)
            config.save_pretrained(folder)
    staged = [(name, os.path.join(folder, name))
              for name in (sorted(os.listdir(folder)) if os.path.isdir(folder) else [])]
    index = stage_index(directory, plan.layouts, plan.token)
    return staged + ([(SAFE_INDEX, index)] if index else [])


def _place(staged: list[tuple[str, str]], plan: SavePlan, directory: str) -> None:
    for name, temp in staged:
        os.replace(temp, os.path.join(directory, name))
    fsync_dir(directory)
    folder = os.path.join(directory, temp_name("config", plan.token))
    if os.path.isdir(folder):
        os.rmdir(folder)
    names = {s.name for s in plan.layouts}
    for name in os.listdir(directory):
        if name not in names and (name == SAFE_SINGLE or re.fullmatch(
                r"model-\d{5}-of-\d{5}\.safetensors", name)):
            remove_if_present(os.path.join(directory, name))
