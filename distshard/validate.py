"""Check a checkpoint's tensors against the model's before any data moves (pure).

Runs on rank 0 over metadata only: which checkpoint key feeds which model tensor, whether the
shapes agree, whether the dtypes can stand for each other, and which keys are missing or
unexpected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import DistShardError
from .index import FileInfo

__all__ = ["Match", "TargetSpec", "dtype_kind", "match_checkpoint"]


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """What the model holds under ``names`` (several names when weights are tied)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the loaded tensor will have


@dataclass(frozen=True, slots=True)
class Match:
    files: tuple[FileInfo, ...]  # only the files and tensors that will be read
    loaded_keys: tuple[str, ...]
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    # names the model ties that the checkpoint holds as separate tensors (safetensors: separate
    # bytes, which may differ); the first name of each is the one read
    tied_copies: tuple[tuple[str, ...], ...] = ()


def dtype_kind(dtype: torch.dtype) -> str:
    """``'bool'``, ``'int'``, ``'float'`` or ``'complex'``: loads convert only within a kind.

    >>> dtype_kind(torch.bfloat16), dtype_kind(torch.uint8)
    ('float', 'int')
    """
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def match_checkpoint(
    files: Sequence[FileInfo],
    weight_map: Mapping[str, str] | None,
    targets: Sequence[TargetSpec],
    *,
    strict: bool,
) -> Match:
    """Match checkpoint keys to model tensors; raise ``DistShardError`` on any inconsistency."""
    by_name = {f.name: f for f in files}
    where = _locate_keys(files, weight_map)
    needed: dict[str, dict] = {f.name: {} for f in files}
    loaded, missing, tied_copies = [], [], []
    for target in targets:
        present = [n for n in target.names if n in where]
        if not present:
            missing.extend(target.names)
            continue
        source = present[0]  # tied names share one tensor: read it once
        if len(present) > 1 and any(by_name[where[n]].kind == "safetensors" for n in present):
            tied_copies.append(tuple(present))
        file = where[source]
        info = by_name[file].tensors[source]
        _check_compatible(file, source, info.shape, info.dtype, target)
        needed[file][source] = info
        loaded.extend(present)
    model_keys = {n for t in targets for n in t.names}
    unexpected = sorted(k for k in where if k not in model_keys)
    missing.sort()
    if strict and (missing or unexpected):
        raise DistShardError(_strict_message(missing, unexpected),
                             key=(missing or unexpected)[0])
    kept = tuple(dataclasses.replace(f, tensors=needed[f.name]) for f in files if needed[f.name])
    return Match(kept, tuple(sorted(loaded)), tuple(missing), tuple(unexpected),
                 tuple(tied_copies))


def _locate_keys(files: Sequence[FileInfo], weight_map: Mapping[str, str] | None) -> dict[str, str]:
    """key -> file, from the headers, checked against the index."""
    where: dict[str, str] = {}
    for f in files:
        for key in f.tensors:
            if key in where:
                raise DistShardError(
                    f"key {key!r} is in two files, {where[key]!r} and {f.name!r}; a checkpoint "
                    f"must hold each tensor once", file=f.name, key=key)
            where[key] = f.name
    if weight_map is None:
        return where
    for key, name in weight_map.items():
        if where.get(key) != name:
            raise DistShardError(
                f"the index puts key {key!r} in {name!r} but that file's header does not hold it"
                + (f" (it is in {where[key]!r})" if key in where else ""), file=name, key=key)
    # Tensors a file holds beyond what the index names are not part of the checkpoint.
    return {k: where[k] for k in weight_map}


def _check_compatible(file: str, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                      target: TargetSpec) -> None:
    if tuple(shape) != tuple(target.shape):
        raise DistShardError(
            f"shape mismatch for key {key!r}: the checkpoint has {list(shape)}, the model "
            f"expects {list(target.shape)}; build the model from the checkpoint's config",
            file=file, key=key)
    if dtype_kind(dtype) != dtype_kind(target.dtype):
        raise DistShardError(
            f"dtype mismatch for key {key!r}: the checkpoint holds {dtype}, which cannot stand "
            f"for the model's {target.dtype} ({dtype_kind(dtype)} data for a "
            f"{dtype_kind(target.dtype)} tensor)", file=file, key=key)


def _strict_message(missing: list[str], unexpected: list[str]) -> str:
    parts = ["the checkpoint does not match the model (strict=True)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    parts.append("pass strict=False to load the keys that match and list the rest in the report")
    return "; ".join(parts)
