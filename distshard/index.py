"""Find and describe a checkpoint: the index, the safetensors headers, the ``.bin`` pickles.

Only metadata is read here, never tensor data. safetensors headers are parsed and validated
here, by the rules of the safetensors library (header size cap, dtype names, offsets that tile
the data area exactly, byte lengths that match shapes, ``__metadata__`` string to string), which
does not expose the byte offsets a ranged read needs; ``tests/test_index.py`` checks that this
parser accepts exactly the files ``safe_open`` accepts.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DistShardError
from .record import per_tensor

__all__ = [
    "Checkpoint",
    "FileInfo",
    "TensorInfo",
    "describe_file",
    "find_checkpoint",
    "safe_path",
]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# safetensors refuses headers above 100 MB; an index json of that size is equally absurd.
MAX_INDEX_BYTES = 100_000_000

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}


@per_tensor
class TensorInfo:
    """One tensor of a checkpoint file. ``begin`` is a byte offset into the file (safetensors
    only; ``None`` for ``.bin`` files, whose tensors are found by key)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One checkpoint file as rank 0 saw it while planning (size and mtime guard against the
    file changing before its owner reads it)."""

    name: str
    kind: str  # "safetensors" | "bin"
    size: int
    mtime_ns: int
    tensors: dict[str, TensorInfo]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a checkpoint lives, its files, and which file holds each key (``weight_map``;
    ``None`` for a single-file checkpoint, whose keys are those of its one file)."""

    root: str
    kind: str  # "safetensors" | "bin"
    files: tuple[str, ...]
    weight_map: dict[str, str] | None
    metadata: dict | None = None  # the index's "metadata" (total_size, sometimes dtype)


def find_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Resolve a folder or file into a :class:`Checkpoint` (safetensors wins over ``.bin``)."""
    p = Path(path)
    if p.is_dir():
        for name, kind in ((SAFE_INDEX, "safetensors"), (SAFE_SINGLE, "safetensors"),
                           (BIN_INDEX, "bin"), (BIN_SINGLE, "bin")):
            if (p / name).is_file():
                return _from_file(p / name, kind)
        raise DistShardError(
            f"no checkpoint in folder {str(p)!r}: expected one of {SAFE_INDEX}, {SAFE_SINGLE}, "
            f"{BIN_INDEX} or {BIN_SINGLE}", file=str(p))
    if not p.exists():
        raise DistShardError(f"checkpoint {str(p)!r} does not exist", file=str(p))
    if p.name.endswith(".index.json"):
        kind = "safetensors" if ".safetensors" in p.name else "bin"
    else:
        kind = "safetensors" if p.suffix == ".safetensors" else "bin"
    return _from_file(p, kind)


def _from_file(p: Path, kind: str) -> Checkpoint:
    root = str(p.parent.absolute())
    if not p.name.endswith(".index.json"):
        return Checkpoint(root=root, kind=kind, files=(p.name,), weight_map=None)
    weight_map, metadata = _read_index(p)
    checked = set()
    for key, name in weight_map.items():  # refuse bad paths before touching any file
        if name not in checked:  # each file once (the error names its first key)
            safe_path(root, name, key=key)
            checked.add(name)
    return Checkpoint(root=root, kind=kind, files=tuple(sorted(set(weight_map.values()))),
                      weight_map=weight_map, metadata=metadata)


def _read_index(p: Path) -> tuple[dict[str, str], dict | None]:
    if p.stat().st_size > MAX_INDEX_BYTES:
        raise DistShardError(f"index {p.name!r} is larger than {MAX_INDEX_BYTES} bytes", file=p.name)
    try:
        index = json.loads(p.read_bytes())
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the parser's depth
        raise DistShardError(f"index {p.name!r} is not valid JSON: {e}", file=p.name) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DistShardError(
            f"index {p.name!r} has no 'weight_map' naming tensor files", file=p.name)
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise DistShardError(
                f"index {p.name!r} maps key {key!r} to {name!r}, not a file name",
                file=p.name, key=key)
    metadata = index.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else None


def safe_path(root: str, name: str, *, key: str | None = None) -> str:
    """The absolute path of checkpoint file ``name`` inside ``root``, or ``DistShardError``.

    Rules: ``name`` is relative and has no ``..`` part; once symbolic links are followed it is
    still inside ``root`` -- or, for a Hugging Face cache snapshot (``.../snapshots/<rev>/``),
    inside that repository's ``blobs/`` folder, where the cache keeps the real files.

    >>> safe_path("/ckpt", "/etc/passwd")
    Traceback (most recent call last):
    ...
    distshard.errors.DistShardError: file '/etc/passwd' is an absolute path; ...
    """
    if "\0" in name:
        raise DistShardError(f"file {name!r} has a NUL character; a file name cannot",
                             file=name, key=key)
    parts = Path(name).parts
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise DistShardError(
            f"file {name!r} is an absolute path; the index may only name files inside the "
            f"checkpoint folder", file=name, key=key)
    if ".." in parts or "\\" in name:
        raise DistShardError(
            f"file {name!r} leaves the checkpoint folder ('..' or '\\'); the index may only name "
            f"files inside it", file=name, key=key)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, name))
    allowed = [real_root]
    if os.path.basename(os.path.dirname(real_root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(real_root)), "blobs"))
    if not any(real.startswith(a + os.sep) for a in allowed):
        raise DistShardError(
            f"file {name!r} resolves to {real!r}, outside the checkpoint folder {real_root!r} "
            f"(a symbolic link may only point inside it, or into a Hugging Face cache's blobs/)",
            file=name, key=key)
    return real


def describe_file(root: str, name: str, kind: str) -> FileInfo:
    """Read and validate the metadata of one checkpoint file (never its tensor data)."""
    path = safe_path(root, name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DistShardError(f"file {name!r} named by the index does not exist", file=name) from None
    if not stat.S_ISREG(st.st_mode):
        raise DistShardError(f"file {name!r} is not a regular file", file=name)
    tensors = _safetensors_header(path, name) if kind == "safetensors" else _bin_header(path, name)
    return FileInfo(name=name, kind=kind, size=st.st_size, mtime_ns=st.st_mtime_ns, tensors=tensors)


# safetensors' own cap on the header length.
MAX_HEADER_BYTES = 100_000_000


def _safetensors_header(path: str, name: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header by the format's rules: a little-endian u64 length,
    that many bytes of a JSON object mapping keys to ``{dtype, shape, data_offsets}`` (plus an
    optional ``__metadata__`` of strings), and tensor data that tiles the rest of the file exactly,
    with no gap and no overlap. Reads the header only: opening the file with safetensors maps it,
    and the kernel's read-ahead then pulls megabytes of tensor data that another rank owns."""

    def bad(why: str, key: str | None = None) -> DistShardError:
        return DistShardError(f"file {name!r} is not a valid safetensors file: {why}",
                              file=name, key=key)

    with open(path, "rb", buffering=0) as f:
        # No read-ahead: it would pull megabytes of tensor data into this node's page cache,
        # bytes that ranks of other nodes read from their own copies.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it has {size} bytes, fewer than the 8 of the header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise bad(f"header length {header_len} exceeds the {MAX_HEADER_BYTES} byte cap")
        if 8 + header_len > size:
            raise bad(f"header length {header_len} runs past the end of the file ({size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad("__metadata__ is not a map of strings to strings")
    data_start = 8 + header_len
    tensors = {}
    position, in_order = 0, True  # whether the entries so far follow each other in the data
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape
    for key, entry in header.items():
        # the checks of _header_entry, inline for an entry that passes them (a file holds up to
        # hundreds of thousands); an entry that does not goes to _header_entry, which says why
        ok = type(entry) is dict and entry.keys() == _ENTRY_FIELDS
        if ok:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(dtype) if type(dtype) is str else None
            ok = (dtype is not None and type(shape) is list and type(offsets) is list
                  and len(offsets) == 2)
        if ok:
            numel = 1
            for n in shape:
                if type(n) is not int or n < 0:  # (JSON gives int, bool, float: not a subclass)
                    ok = False
                    break
                numel *= n
            begin, end = offsets
            ok = ok and type(begin) is int and type(end) is int and 0 <= begin <= end
        if ok:
            shape = tuple(shape)
        else:
            dtype, shape, (begin, end) = _header_entry(key, entry, bad)
            numel = 1
            for n in shape:
                numel *= n
        if end - begin != numel * dtype.itemsize:
            raise bad(f"key {key!r} has {end - begin} bytes, but shape {list(shape)} of "
                      f"{dtype} needs {numel * dtype.itemsize}", key)
        if begin == position:
            position = end
        else:
            in_order = False
        # interned: the model's names are (see ModelTargets), and the plan then holds one object
        # per name, which its pickle holds once
        tensors[sys.intern(key)] = TensorInfo(dtype, shapes.setdefault(shape, shape),
                                              data_start + begin)
    if not in_order:  # (safetensors writes them in order; other writers need not)
        position = 0
        for begin, end, key in sorted((t.begin - data_start, t.begin - data_start + t.nbytes, k)
                                      for k, t in tensors.items()):
            if begin != position:
                raise bad(f"key {key!r} starts at data byte {begin}, expected {position} "
                          f"(tensors overlap or leave a gap)", key)
            position = end
    if position != size - data_start:
        raise bad(f"tensor data ends at byte {position}, but the file holds "
                  f"{size - data_start} bytes of data")
    return tensors


_ENTRY_FIELDS = frozenset(("dtype", "shape", "data_offsets"))


def _header_entry(key: str, entry, bad) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    def is_count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"key {key!r} is not an entry of dtype, shape and data_offsets", key)
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"key {key!r} has dtype {entry['dtype']!r}, which is unknown or one "
                  "distshard does not load", key)
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(is_count(n) for n in shape):
        raise bad(f"key {key!r} has shape {shape!r}, not a list of sizes", key)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(n) for n in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"key {key!r} has data_offsets {offsets!r}, not [begin, end]", key)
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _bin_header(path: str, name: str) -> dict[str, TensorInfo]:
    # weights_only refuses any pickle that would run code; mmap keeps the data on disk.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise DistShardError(
            f"file {name!r} could not be read with torch.load(weights_only=True): {e}",
            file=name) from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DistShardError(f"file {name!r} is not a dict of tensors", file=name)
    return {sys.intern(k): TensorInfo(dtype=v.dtype, shape=tuple(v.shape), begin=None)
            for k, v in state.items()}  # (interned as a safetensors header's keys are)
