"""Write Hugging Face style safetensors checkpoints: ``save`` from a model across a job, and the
streaming rewrite behind ``distshard reshard``.

Both cut tensors into files with one function, :func:`plan_shards` (transformers' rule and names:
tensors in order, a new file when the next one would pass ``max_shard_size``,
``model-00001-of-00003.safetensors`` or a single ``model.safetensors``), and both make files
appear only whole: each is written under a temporary name in the target folder, fsync'd, and
renamed; the index comes last, so a reader never finds an index naming a missing or half-written
file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from . import _faults
from .comm import Comm, failure_of
from .errors import DistShardError
from .index import (
    SAFE_INDEX,
    SAFE_SINGLE,
    SAFETENSORS_DTYPES,
    Checkpoint,
    FileInfo,
    TensorInfo,
)
from .loader import DEFAULT_TIMEOUT

__all__ = [
    "SaveReport",
    "ShardLayout",
    "TensorLayout",
    "assign_writers",
    "parse_size",
    "plan_shards",
    "remove_temporaries",
    "reshard",
    "save",
    "write_file",
    "write_index",
]

logger = logging.getLogger("distshard")

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
COPY_CHUNK = 8 * 2**20  # bytes moved per system call when copying or writing tensor data
TEMP_SUFFIX = ".tmp"


def parse_size(size: int | str) -> int:
    """Bytes in ``size``, read as transformers reads ``max_shard_size``: decimal ``KB``/``MB``/
    ``GB``, binary ``KiB``/``MiB``/``GiB``, a lower-case ``b`` for bits.

    >>> parse_size("200MB"), parse_size("40KB"), parse_size("1MiB"), parse_size(7)
    (200000000, 40000, 1048576, 7)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be bytes or a string such as '5GB', got {size!r}")
    value = size
    if isinstance(size, str):
        text = size.strip()
        units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                 ("KB", 10**3))
        unit = next(((u, f) for u, f in units if text.upper().endswith(u)), None)
        try:
            if unit is None:
                raise ValueError
            value = int(text[:-len(unit[0])]) * unit[1]
        except ValueError:
            raise ValueError(f"max_shard_size {size!r} is not a whole number followed by KB, MB, GB, "
                             "KiB, MiB or GiB (e.g. '5GB')") from None
        if text.endswith("b") and not text.upper().endswith("IB"):
            value //= 8
    if value < 1:
        raise ValueError(f"max_shard_size must be at least one byte, got {size!r}")
    return value


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """Where one tensor lies in its output file: ``begin`` counts from the start of the file."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """One output file: its name, its complete header, and its tensors in data order."""

    name: str
    header: bytes
    tensors: tuple[TensorLayout, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.nbytes


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel * dtype.itemsize


def plan_shards(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                max_shard_size: int | str) -> list[ShardLayout]:
    """Cut ``(key, dtype, shape)`` entries, in order, into files of at most ``max_shard_size``
    tensor bytes (a larger tensor gets a file of its own), named as transformers names them, each
    with its safetensors header. Pure: the one planner of ``save`` and ``reshard``.

    >>> [s.name for s in plan_shards([("a", torch.float32, (10,)), ("b", torch.int8, (30,))], 50)]
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    >>> [s.name for s in plan_shards([("a", torch.float32, (10,))], "1KB")]
    ['model.safetensors']
    """
    limit = parse_size(max_shard_size)
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
    current: list = []
    current_bytes = 0
    for key, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise DistShardError(f"key {key!r} has dtype {dtype}, which safetensors files of "
                                 "distshard do not hold; convert it first", key=key)
        size = _nbytes(dtype, shape)
        if size > limit:
            groups.append([(key, dtype, tuple(shape))])
            continue
        if current and current_bytes + size > limit:
            groups.append(current)
            current, current_bytes = [], 0
        current.append((key, dtype, tuple(shape)))
        current_bytes += size
    if current or not groups:
        groups.append(current)
    if len(groups) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return [_layout(name, group) for name, group in zip(names, groups)]


def _layout(name: str, group: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> ShardLayout:
    # Wider dtypes first, as safetensors orders them: with the header padded to 8 bytes every
    # tensor then starts at a multiple of its element size.
    ordered = sorted(group, key=lambda e: -e[1].itemsize)
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset, spans = 0, []
    for key, dtype, shape in ordered:
        size = _nbytes(dtype, shape)
        entries[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        spans.append((key, dtype, shape, offset, size))
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    header = len(text).to_bytes(8, "little") + text
    return ShardLayout(name, header, tuple(TensorLayout(k, d, s, len(header) + o, n)
                                           for k, d, s, o, n in spans))


def assign_writers(file_bytes: Sequence[int], world_size: int) -> list[int]:
    """The rank that writes each file, balanced by bytes: largest file first to the rank with
    the fewest bytes so far (ties: the earlier file, the lower rank). Deterministic.

    >>> assign_writers([10, 10, 30, 5], 2)
    [1, 1, 0, 1]
    """
    load = [0] * world_size
    owner = [0] * len(file_bytes)
    for i in sorted(range(len(file_bytes)), key=lambda i: (-file_bytes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += file_bytes[i]
    return owner


def temp_name(name: str, token: str) -> str:
    """The hidden name ``name`` is written under until it is complete."""
    return f".{name}.{token}{TEMP_SUFFIX}"


def remove_temporaries(directory: str, token: str) -> None:
    """Remove every temporary file of the write ``token`` in ``directory`` (any rank's)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(f".{token}{TEMP_SUFFIX}"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``tensor`` (copied only when not contiguous on the CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_all(fd: int, data: memoryview) -> None:
    for start in range(0, len(data), COPY_CHUNK):
        chunk = data[start:start + COPY_CHUNK]
        while chunk:
            chunk = chunk[os.write(fd, chunk):]


def copy_range(src_fd: int, offset: int, count: int, dst_fd: int) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``: in the kernel where
    it can (``copy_file_range``), else through one reused buffer of :data:`COPY_CHUNK` bytes."""
    if USE_COPY_FILE_RANGE and hasattr(os, "copy_file_range"):
        try:
            while count:
                n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
                if n == 0:
                    raise DistShardError("source file ended before the tensor's last byte")
                offset, count = offset + n, count - n
            return
        except OSError:  # another file system, or a kernel without it: copy by hand
            pass
    buf = bytearray(min(count, COPY_CHUNK))
    view = memoryview(buf)
    while count:
        n = os.preadv(src_fd, [view[:min(count, len(buf))]], offset)
        if n == 0:
            raise DistShardError("source file ended before the tensor's last byte")
        write_all(dst_fd, view[:n])
        offset, count = offset + n, count - n


USE_COPY_FILE_RANGE = True


def write_file(directory: str, layout: ShardLayout, token: str, fill) -> str:
    """Write ``layout``'s header, then call ``fill(fd, tensor_layout)`` for each tensor in data
    order (it appends exactly that tensor's bytes); fsync and return the temporary path. The
    caller renames it once every file of the checkpoint is complete."""
    path = os.path.join(directory, temp_name(layout.name, token))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, memoryview(layout.header))
        for t in layout.tensors:
            fill(fd, t)
        if os.lseek(fd, 0, os.SEEK_CUR) != layout.size:
            raise DistShardError(f"file {layout.name!r} came out {os.lseek(fd, 0, os.SEEK_CUR)} "
                                 f"bytes long, expected {layout.size}", file=layout.name)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_index(directory: str, layouts: Sequence[ShardLayout], token: str) -> str | None:
    """Write ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``) through a
    temporary file, when there is more than one file; return its name."""
    if len(layouts) < 2:
        return None
    weight_map = {t.key: s.name for s in layouts for t in sorted(s.tensors, key=lambda t: t.key)}
    index = {"metadata": {"total_size": sum(s.nbytes for s in layouts)}, "weight_map": weight_map}
    path = os.path.join(directory, temp_name(SAFE_INDEX, token))
    with open(path, "x") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path, os.path.join(directory, SAFE_INDEX))
    fsync_dir(directory)
    return SAFE_INDEX


def new_token() -> str:
    return secrets.token_hex(6)

@dataclass(frozen=True, slots=True)
class Piece:
    """One distinct local box of a DTensor, and the rank that gives it to the file's writer
    (the writer itself when it holds the box, else the lowest rank holding it)."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    src: int


@dataclass(frozen=True, slots=True)
class SavePlan:
    """What rank 0 decides and broadcasts: the files, who writes each, and where every piece
    of every DTensor comes from."""

    layouts: tuple[ShardLayout, ...]
    writers: tuple[int, ...]
    pieces: dict[str, tuple[Piece, ...]]  # DTensor keys only; plain tensors are replicated
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

    Files appear only whole (temporary name, fsync, rename), and the index last, after every
    rank agreed. Any failure raises the same :class:`DistShardError` on every rank and leaves
    no index and no temporary file of this save.
    """
    limit = parse_size(max_shard_size)
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be a positive timedelta or seconds, got {timeout!r}")
    comm = Comm(group, timeout, action="save")
    directory = os.path.abspath(os.fspath(directory))
    started = time.perf_counter()
    plan = None
    try:
        tensors, plan = _plan(model, directory, limit, comm)
        stats, written = _write(tensors, plan, directory, comm)
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


def _plan(model: torch.nn.Module, directory: str, limit: int,
          comm: Comm) -> tuple[dict[str, torch.Tensor], SavePlan]:
    """Every rank lists what it saves and its DTensor boxes; rank 0 plans and makes the folder;
    all agree, then rank 0's plan is broadcast."""
    failure, tensors, signature, boxes = None, {}, 0, {}
    try:
        tensors = tensors_to_save(model)
        text = "\n".join(f"{k}:{t.dtype}:{list(t.shape)}:{isinstance(t, DTensor)}"
                         for k, t in tensors.items())
        signature = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
        boxes = {k: _box(t) for k, t in tensors.items() if isinstance(t, DTensor)}
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
            plan = _make_plan(tensors, all_boxes, limit, comm.world_size)
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
    copies = _tied_copies(model)
    kept = set()
    for names in names_of.values():
        originals = [n for n in names if not any(_matches(p, n) for p in copies)]
        kept.add((originals or names)[0])
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


def _box(t: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offset), tuple(shape)


def _make_plan(tensors: dict[str, torch.Tensor], all_boxes: list[dict] | None, limit: int,
               world_size: int) -> SavePlan:
    layouts = plan_shards(((k, t.dtype, tuple(t.shape)) for k, t in tensors.items()), limit)
    writers = assign_writers([s.size for s in layouts], world_size)
    writer_of = {t.key: writers[i] for i, s in enumerate(layouts) for t in s.tensors}
    pieces = {}
    for key in all_boxes[0] if all_boxes else ():
        pieces[key] = _pieces(key, tuple(tensors[key].shape), [b.get(key) for b in all_boxes],
                              writer_of[key])
    return SavePlan(tuple(layouts), tuple(writers), pieces, new_token())


def _pieces(key: str, shape: tuple[int, ...], boxes: list, writer: int) -> tuple[Piece, ...]:
    """One piece per distinct non-empty box; the boxes must cover the tensor exactly."""
    holders: dict[tuple, list[int]] = {}
    for rank, box in enumerate(boxes):
        if box is None:
            raise DistShardError(f"key {key!r} is a DTensor on rank 0 but not on rank {rank}",
                                 key=key)
        if _nbytes(torch.uint8, box[1]) and box not in holders:
            holders[box] = []
        if box in holders:
            holders[box].append(rank)
    inside = all(o + n <= s for (off, shp) in holders for o, n, s in zip(off, shp, shape))
    if not inside or sum(_nbytes(torch.uint8, b[1]) for b in holders) != _nbytes(torch.uint8, shape):
        raise DistShardError(
            f"the local shards of DTensor key {key!r} do not tile its shape {list(shape)}: "
            "distshard saves Shard and Replicate placements over the ranks of group", key=key)
    return tuple(Piece(off, shp, writer if writer in ranks else ranks[0])
                 for (off, shp), ranks in holders.items())


def _write(tensors: dict[str, torch.Tensor], plan: SavePlan, directory: str,
           comm: Comm) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """In rounds, each rank writes its next file: one exchange sends every DTensor piece of the
    round's files to their writers, then all writers write at once. A rank that failed keeps
    taking part in the exchanges; all agree at the end."""
    failure, written = None, []
    bytes_written = bytes_sent = bytes_received = peak = 0
    files_by_rank = [plan.files_of(r) for r in range(comm.world_size)]
    for step in range(max(len(f) for f in files_by_rank)):
        sends, recvs, received = [], [], {}
        for i in (files[step] for files in files_by_rank if step < len(files)):
            writer = plan.writers[i]
            for t in plan.layouts[i].tensors:
                for piece in plan.pieces.get(t.key, ()):
                    if piece.src == writer:
                        continue
                    if piece.src == comm.rank:
                        sends.append((tensors[t.key].to_local().contiguous(), writer))
                    elif writer == comm.rank:
                        buf = torch.empty(piece.shape, dtype=t.dtype, device=comm.device)
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

        def fill(fd: int, t: TensorLayout) -> None:
            nonlocal peak
            value = tensors[t.key]
            if isinstance(value, DTensor):
                value = _assemble(value, plan.pieces[t.key], received, t.key, comm.rank)
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


def _assemble(value: DTensor, pieces: tuple[Piece, ...], received: dict, key: str,
              rank: int) -> torch.Tensor:
    full = torch.empty(tuple(value.shape), dtype=value.dtype, device="cpu")
    for piece in pieces:
        part = value.to_local() if piece.src == rank else received[key, piece]
        full[tuple(slice(o, o + n) for o, n in zip(piece.offset, piece.shape))].copy_(part)
    return full


def _commit(model: torch.nn.Module, plan: SavePlan, directory: str,
            written: list[tuple[str, str]], comm: Comm) -> None:
    """Rank 0 removes an old index (so none names a mix of files), every writer renames its
    files into place, then rank 0 checks it sees them all, writes the config and the index, and
    removes shards of an older save that the new one does not have. Each step is agreed."""
    failure = None
    try:
        if comm.rank == 0:
            _remove(os.path.join(directory, SAFE_INDEX))
    except Exception as e:
        failure = failure_of(e, comm.rank, "commit")
    comm.agree(failure, [])
    try:
        for name, temp in written:
            os.replace(temp, os.path.join(directory, name))
        if written:
            fsync_dir(directory)
    except Exception as e:
        failure = failure_of(e, comm.rank, "commit")
    comm.agree(failure, [])
    try:
        if comm.rank == 0:
            _finish(model, plan, directory)
    except Exception as e:
        failure = failure_of(e, comm.rank, "commit")
    comm.agree(failure, [])


def _finish(model: torch.nn.Module, plan: SavePlan, directory: str) -> None:
    for layout, writer in zip(plan.layouts, plan.writers):
        path = os.path.join(directory, layout.name)
        size = os.stat(path).st_size if os.path.exists(path) else None
        if size != layout.size:
            raise DistShardError(
                f"file {layout.name!r} written by rank {writer} is {size} bytes on rank 0, "
                f"expected {layout.size}: {directory!r} must be storage every rank shares",
                file=layout.name)
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if callable(getattr(config, "save_pretrained", None)):
            config.save_pretrained(directory)
    write_index(directory, plan.layouts, plan.token)
    names = {s.name for s in plan.layouts}
    for name in os.listdir(directory):
        if name not in names and (name == SAFE_SINGLE or re.fullmatch(
                r"model-\d{5}-of-\d{5}\.safetensors", name)):
            _remove(os.path.join(directory, name))


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- reshard: a checkpoint into new files, streamed ------------------------------------------

# Files of a checkpoint folder that are weights in some format; every other top-level file
# (config, generation config, tokenizer) is copied beside the new weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def reshard(ckpt: Checkpoint, files: Sequence[FileInfo], out: str | os.PathLike,
            max_shard_size: int | str) -> dict:
    """Rewrite the checkpoint ``ckpt`` (its ``files`` as :func:`describe_file` read them) as
    safetensors files of at most ``max_shard_size`` in the new folder ``out``; return what was
    written. Memory stays at one copy buffer: headers come from the input headers, tensor bytes
    are copied in chunks (in the kernel where it can), ``.bin`` files are mapped one at a time.
    ``out`` must be new or empty and not the checkpoint's folder; on failure it is left empty."""
    out = os.path.abspath(os.fspath(out))
    _check_out(ckpt, out)
    sources = _sources(ckpt, files)
    layouts = plan_shards(((k, t.dtype, t.shape) for k, (_, t) in sources.items()), max_shard_size)
    token = new_token()
    os.makedirs(out, exist_ok=True)
    placed: list[str] = []
    try:
        with _Reader(ckpt.root) as reader:
            temps = [write_file(out, layout, token,
                                lambda fd, t: reader.copy(*sources[t.key], t.key, fd))
                     for layout in layouts]
        for layout, temp in zip(layouts, temps):
            os.replace(temp, os.path.join(out, layout.name))
            placed.append(os.path.join(out, layout.name))
        copied = _copy_side_files(ckpt, out, token, placed)
        fsync_dir(out)
        index = write_index(out, layouts, token)
    except BaseException as e:
        remove_temporaries(out, token)
        for path in placed:
            _remove(path)
        if isinstance(e, OSError):
            raise DistShardError(f"cannot write in {out!r}: {e}", file=e.filename) from e
        raise
    return dict(
        checkpoint=ckpt.root, format=ckpt.kind, source_files=len(files), out=out,
        max_shard_size=parse_size(max_shard_size),
        files=[dict(name=s.name, bytes=s.size, tensors=len(s.tensors)) for s in layouts],
        index=index, tensors=len(sources), tensor_bytes=sum(s.nbytes for s in layouts),
        copied=copied)


def _check_out(ckpt: Checkpoint, out: str) -> None:
    if os.path.realpath(out) == os.path.realpath(ckpt.root):
        raise DistShardError(f"the output folder {out!r} is the checkpoint's own folder; write "
                             "the new files to a new or empty folder", file=out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise DistShardError(f"the output {out!r} exists and is not a folder", file=out)
    if os.path.isdir(out) and os.listdir(out):
        raise DistShardError(f"the output folder {out!r} is not empty; give a new or empty "
                             "folder (nothing there is overwritten)", file=out)


def _sources(ckpt: Checkpoint, files: Sequence[FileInfo]) -> dict[str, tuple[FileInfo, TensorInfo]]:
    """Every key and where its bytes are: in the index's order when there is one, else in the
    order of the data in the file."""
    found = {key: (f, t) for f in files
             for key, t in sorted(f.tensors.items(), key=lambda kv: kv[1].begin or 0)}
    order = [k for k in (ckpt.weight_map or {}) if k in found]
    return {key: found[key] for key in order + [k for k in found if k not in set(order)]}


class _Reader:
    """Open checkpoint files: safetensors by descriptor, ``.bin`` mapped, one at a time."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[str, int] = {}
        self.bin_name: str | None = None
        self.bin_state: dict[str, torch.Tensor] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.bin_state = {}

    def copy(self, f: FileInfo, t: TensorInfo, key: str, fd: int) -> None:
        """Append the bytes of ``key`` (described by ``t`` in file ``f``) to ``fd``."""
        if f.kind == "safetensors":
            if f.name not in self.fds:
                src = os.open(os.path.join(self.root, f.name), os.O_RDONLY)
                self.fds[f.name] = src
                if os.fstat(src).st_size != f.size:
                    raise DistShardError(f"file {f.name!r} changed while it was resharded",
                                         file=f.name)
            copy_range(self.fds[f.name], t.begin, t.nbytes, fd)
            return
        if self.bin_name != f.name:
            self.bin_state = {}  # unmap the previous file first
            self.bin_state = torch.load(os.path.join(self.root, f.name), map_location="cpu",
                                        weights_only=True, mmap=True)
            self.bin_name = f.name
        value = self.bin_state[key]
        if value.dtype != t.dtype or tuple(value.shape) != t.shape:
            raise DistShardError(f"file {f.name!r} changed while it was resharded", file=f.name,
                                 key=key)
        write_all(fd, tensor_bytes(value))


def _copy_side_files(ckpt: Checkpoint, out: str, token: str, placed: list[str]) -> list[str]:
    copied = []
    for name in sorted(os.listdir(ckpt.root)):
        path = os.path.join(ckpt.root, name)
        if name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or not os.path.isfile(path):
            continue
        temp = os.path.join(out, temp_name(name, token))
        shutil.copyfile(path, temp)
        os.replace(temp, os.path.join(out, name))
        placed.append(os.path.join(out, name))
        copied.append(name)
    return copied
