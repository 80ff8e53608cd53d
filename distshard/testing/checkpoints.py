"""Small sharded checkpoints written the way users' tools write them (see
:mod:`distshard.testing`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

__all__ = ["parse_size", "write_checkpoint"]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``, a count or a string with Hugging Face's units (KB = 1000 bytes).

    >>> parse_size("40KB"), parse_size("1MiB"), parse_size(512)
    (40000, 1048576, 512)
    """
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"max_shard_size must be a positive byte count like 40KB, got {size!r}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]


def write_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, *,
                     max_shard_size: int | str = "40KB", format: str = "safetensors") -> str:
    """Write ``model``'s state dict as a (sharded) Hugging Face checkpoint; return the folder.

    A transformers model in safetensors is written by its own ``save_pretrained``. Anything
    else, and every ``.bin`` checkpoint (transformers 5 no longer writes them), is written here
    the way those tools did: shards of at most ``max_shard_size`` in state-dict order, named
    ``model-00001-of-0000n.safetensors`` / ``pytorch_model-00001-of-0000n.bin`` with their
    index json, or one ``model.safetensors`` / ``pytorch_model.bin`` when everything fits.
    Tied weights: safetensors keeps the first name (the loader re-ties); a ``.bin`` keeps every
    name, with tensors that share storage in one file, as ``torch.save`` of a state dict does.
    The model must be unsharded and off the meta device.
    """
    if format not in ("safetensors", "bin"):
        raise ValueError(f"format must be 'safetensors' or 'bin', got {format!r}")
    limit = parse_size(max_shard_size)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if format == "safetensors" and callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(path, max_shard_size=limit)
        return str(path)
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(path)
    state = model.state_dict()
    groups = _storage_groups(state, dedupe=format == "safetensors")
    order = {name: i for i, name in enumerate(state)}  # each file keeps the state-dict order
    shards = [dict(sorted(s.items(), key=lambda kv: order[kv[0]])) for s in _split(groups, limit)]
    prefix, ext = ("model", "safetensors") if format == "safetensors" else ("pytorch_model", "bin")
    names = ([f"{prefix}.{ext}"] if len(shards) == 1 else
             [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        if format == "safetensors":
            from safetensors.torch import save_file
            save_file(shard, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(shard, path / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(g) for g in groups)},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (path / f"{prefix}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return str(path)


def _storage_groups(state: dict[str, torch.Tensor], *, dedupe: bool) -> list[dict[str, torch.Tensor]]:
    """State-dict entries grouped by the storage they share, in state-dict order. With
    ``dedupe``, names of the very same tensor collapse to the first, and every tensor gets its
    own contiguous copy (safetensors refuses shared or strided storage)."""
    groups: dict[object, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or isinstance(t, DTensor):
            raise ValueError(f"write_checkpoint: {name!r} is a {type(t).__name__}; gather a "
                             "sharded model (DTensor) into plain tensors first")
        if t.device.type == "meta":
            raise ValueError(f"write_checkpoint: {name!r} is on the meta device: no values to write")
        t = t.detach().cpu()
        storage = (t.untyped_storage().data_ptr() if t.numel() else ("empty", name))
        if dedupe:
            ident = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in groups:
                continue
            groups[ident] = {name: t.clone(memory_format=torch.contiguous_format)}
        else:
            groups.setdefault(storage, {})[name] = t.contiguous()
    return list(groups.values())


def _nbytes(group: dict[str, torch.Tensor]) -> int:
    seen = {}
    for t in group.values():
        seen[t.untyped_storage().data_ptr() or id(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _split(groups: list[dict[str, torch.Tensor]], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for group in groups:
        n = _nbytes(group)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += n
    return shards
