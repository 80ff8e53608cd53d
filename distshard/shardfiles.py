"""Safetensors shard files, as Hugging Face writes them: the rule that cuts tensors into files
(transformers' rule and names: tensors in order, a new file when the next one would pass
``max_shard_size``, ``model-00001-of-00003.safetensors`` or a single ``model.safetensors``), and
writes that make files appear only whole: each file is written under a temporary name in the
target folder, fsync'd, and renamed; the index comes last, so a reader never finds an index
naming a missing or half-written file. Used by :func:`distshard.save` (``writer.py``) and by
``distshard reshard`` (``reshard.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import DistShardError
from .index import SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_DTYPES
from .record import per_tensor

__all__ = [
    "COPY_CHUNK",
    "ShardLayout",
    "TensorLayout",
    "assign_writers",
    "fsync_dir",
    "nbytes_of",
    "new_token",
    "parse_size",
    "plan_shards",
    "remove_if_present",
    "remove_temporaries",
    "stage_index",
    "temp_name",
    "tensor_bytes",
    "write_all",
    "write_file",
    "write_index",
]

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
COPY_CHUNK = 8 * 2**20  # bytes moved per system call when copying or writing tensor data
TEMP_SUFFIX = ".tmp"


def parse_size(size: int | str) -> int:
    """Bytes in ``size``, read as transformers' ``save_pretrained`` reads ``max_shard_size``
    (huggingface_hub's rule): a number, whole or not, then ``KB``, ``MB``, ``GB`` or ``TB`` in
    any case, decimal. Also, beyond that rule: binary ``KiB``/``MiB``/``GiB``/``TiB``.

    >>> parse_size("200MB"), parse_size("40kb"), parse_size("1.5GB"), parse_size("1MiB")
    (200000000, 40000, 1500000000, 1048576)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be bytes or a string such as '5GB', got {size!r}")
    value = size
    if isinstance(size, str):
        text = size.strip()
        units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        unit = text[-3:].upper() if text[-3:].upper() in units else text[-2:].upper()
        try:
            if unit not in units:
                raise ValueError
            value = int(float(text[:-len(unit)].strip()) * units[unit])
        except (ValueError, OverflowError):
            raise ValueError(f"max_shard_size {size!r} is not a number followed by KB, MB, GB, "
                             "TB, KiB, MiB, GiB or TiB (e.g. '5GB')") from None
    if value < 1:
        raise ValueError(f"max_shard_size must be at least one byte, got {size!r}")
    return value


@per_tensor
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


def nbytes_of(dtype: torch.dtype, shape: Sequence[int]) -> int:
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
        size = nbytes_of(dtype, shape)
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
        size = nbytes_of(dtype, shape)
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
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):  # a staged config folder
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                os.unlink(path)
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


def stage_index(directory: str, layouts: Sequence[ShardLayout], token: str) -> str | None:
    """Write ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``) under its
    temporary name, when there is more than one file; return that path."""
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
    return path


def write_index(directory: str, layouts: Sequence[ShardLayout], token: str) -> str | None:
    """:func:`stage_index`, then renamed into place; return its name."""
    path = stage_index(directory, layouts, token)
    if path is None:
        return None
    os.replace(path, os.path.join(directory, SAFE_INDEX))
    fsync_dir(directory)
    return SAFE_INDEX


def new_token() -> str:
    return secrets.token_hex(6)


def remove_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

