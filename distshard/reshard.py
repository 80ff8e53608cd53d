"""``distshard reshard``: rewrite a checkpoint as safetensors files of a new size, streamed (one
copy buffer; headers from the input headers; tensor bytes copied in the kernel where it can).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import torch

from .errors import DistShardError
from .index import Checkpoint, FileInfo, TensorInfo, safe_path
from .shardfiles import (
    COPY_CHUNK,
    fsync_dir,
    new_token,
    parse_size,
    plan_shards,
    remove_if_present,
    remove_temporaries,
    temp_name,
    tensor_bytes,
    write_all,
    write_file,
    write_index,
)

__all__ = ["reshard"]

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
            remove_if_present(path)
        if isinstance(e, OSError):
            raise DistShardError(f"cannot write in {out!r}: {e}", file=e.filename) from e
        raise
    return dict(
        checkpoint=ckpt.root, format=ckpt.kind, source_files=len(files), out=out,
        max_shard_size=parse_size(max_shard_size),
        files=[dict(name=s.name, bytes=s.size, tensors=len(s.tensors)) for s in layouts],
        index=index, tensors=len(sources), tensor_bytes=sum(s.nbytes for s in layouts),
        copied=copied)


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
                src = os.open(safe_path(self.root, f.name), os.O_RDONLY)
                self.fds[f.name] = src
                if os.fstat(src).st_size != f.size:
                    raise DistShardError(f"file {f.name!r} changed while it was resharded",
                                         file=f.name)
            copy_range(self.fds[f.name], t.begin, t.nbytes, fd)
            return
        if self.bin_name != f.name:
            self.bin_state = {}  # unmap the previous file first
            self.bin_state = torch.load(safe_path(self.root, f.name), map_location="cpu",
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
        path = safe_path(ckpt.root, name)  # a link out of the checkpoint is refused, not copied
        temp = os.path.join(out, temp_name(name, token))
        shutil.copyfile(path, temp)
        os.replace(temp, os.path.join(out, name))
        placed.append(os.path.join(out, name))
        copied.append(name)
    return copied
