"""Check a checkpoint's tensors against the model's before any data moves (pure).

Runs on rank 0 over metadata only: which checkpoint key feeds which model tensor, whether the
shapes agree, whether the dtypes can stand for each other, and which keys are missing or
unexpected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .boxes import tiles
from .errors import DistShardError
from .index import FileInfo
from .keymap import Conversion, KeyMap, Part, RegexRules, volume
from .record import per_tensor

__all__ = ["Match", "TargetSpec", "dtype_kind", "explain", "is_float8", "match_checkpoint",
           "refuse_quantized", "refuse_unmatched"]


@per_tensor
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
    parts: dict[str, tuple[Part, ...]] | None = None  # checkpoint key -> what it forms
    conversions: tuple[Conversion, ...] = ()
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None  # conversions' targets
    aliases: dict[str, str] | None = None  # tied key -> the key whose checkpoint tensors it reads
    keymap: KeyMap | None = None


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
    rules=None,
    tied: Mapping[str, str] | None = None,
    initializable: frozenset[str] = frozenset(),
) -> Match:
    """Match checkpoint keys to model tensors through ``rules`` (default: every key names a
    model tensor, whole); raise ``DistShardError`` on any inconsistency.

    ``tied`` maps a model key to the key it takes its value from (the model's tied-weights
    declaration): a key the checkpoint lacks is then read from its source's tensors.
    ``initializable``: the missing keys a non-strict load would initialise (for the advice of
    the strict error)."""
    by_name = {f.name: f for f in files}
    where = _locate_keys(files, weight_map)
    checkpoint = {k: (t.shape, t.dtype)
                  for k, f in where.items() for t in (by_name[f].tensors[k],)}
    model = {n: (t.shape, t.dtype) for t in targets for n in t.names}
    try:
        keymap = (rules or RegexRules()).map(checkpoint, model)
    except ValueError as e:
        key = getattr(e, "key", None)
        raise DistShardError(f"the checkpoint's keys cannot be mapped onto the model: {e}",
                             file=where.get(key), key=key) from None
    conversion_of = {t: c for c in keymap.conversions for t in c.targets}
    parts: dict[str, tuple[Part, ...]] = {}  # checkpoint key -> the parts it forms
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    loaded, tied_copies, used, unformed = [], [], [], []
    formed = keymap.formed  # a set built on each call: once here
    used_ids: set[int] = set()
    keymap_parts = keymap.parts
    for target in targets:
        names = target.names
        if len(names) == 1:  # (most targets: no list to make)
            present = names if names[0] in formed else ()
        else:
            present = [n for n in names if n in formed]
        if not present:
            unformed.append(target)
            continue
        name = present[0]  # tied names share one tensor: read it once
        if len(present) > 1 and any(by_name[where[s]].kind == "safetensors"
                                    for n in present for s in keymap.sources_of(n)):
            tied_copies.append(tuple(present))
        got = keymap_parts.get(name)
        if got is not None:
            _check_parts(name, got, target, checkpoint, where)
            for p in got:
                parts[p.source] = parts.get(p.source, ()) + (p,)
        else:
            c = conversion_of[name]
            _check_conversion(name, c, target, checkpoint, where)
            outputs[name] = (target.shape, target.dtype)
            if id(c) not in used_ids:  # one object per conversion (a target is formed once)
                used_ids.add(id(c))
                used.append(c)
        loaded.extend(present)
    aliases, extra = _aliases(targets, unformed, tied or {}, keymap, formed, conversion_of,
                              parts, outputs, checkpoint, where)
    loaded.extend(aliases)
    missing = sorted(n for t in unformed if aliases.keys().isdisjoint(t.names) for n in t.names)
    unexpected = sorted(keymap.unexpected)
    if strict:
        _refuse(missing, unexpected, keymap, initializable)
    sources = set(parts) | {k for c in used for k in c.sources}
    if len(sources) == sum(len(f.tensors) for f in files):  # (every key is read: as they are)
        kept = tuple(files)
    else:
        kept = tuple(dataclasses.replace(f, tensors={k: t for k, t in f.tensors.items()
                                                     if k in sources and where.get(k) == f.name})
                     for f in files)
    kept = tuple(f for f in kept if f.tensors)
    conversions = tuple(_read_targets(c, outputs, extra.get(id(c), [])) for c in used)
    return Match(kept, tuple(sorted(loaded)), tuple(missing), tuple(unexpected),
                 tuple(tied_copies), parts, conversions,
                 outputs, aliases, keymap)


def _aliases(targets: Sequence[TargetSpec], unformed: Sequence[TargetSpec],
             tied: Mapping[str, str], keymap: KeyMap, formed: set[str],
             conversion_of: Mapping[str, Conversion], parts: dict[str, tuple[Part, ...]],
             outputs: dict, checkpoint,
             where) -> tuple[dict[str, str], dict[int, list[tuple[str, str]]]]:
    """Tied keys the checkpoint lacks (of the ``unformed`` targets), read from the checkpoint
    tensors of the key they are tied to (when the model holds them as separate tensors: sharded
    before it was tied): the same parts again, or one more output of the same conversion (by id
    of the conversion)."""
    aliases, extra = {}, {}
    if not (unformed and tied):
        return aliases, extra
    group_of = {n: t for t in targets for n in t.names}
    for target in unformed:
        for name in target.names:
            source = tied.get(name)
            # the checkpoint may hold the source under another name of its own tied group
            source = next((n for n in group_of[source].names if n in formed),
                          None) if source in group_of else None
            if source is None:
                continue
            if source in keymap.parts:
                moved = [dataclasses.replace(p, target=name) for p in keymap.parts[source]]
                _check_parts(name, tuple(moved), target, checkpoint, where)
                for p in moved:
                    parts[p.source] = parts.get(p.source, ()) + (p,)
            elif source in outputs:  # made by a conversion that is read
                c = conversion_of[source]
                _check_conversion(source, c, target, checkpoint, where)
                extra.setdefault(id(c), []).append((name, source))
                outputs[name] = (target.shape, target.dtype)
            else:
                continue
            aliases[name] = source
            break
    return aliases, extra


def _read_targets(c: Conversion, outputs: dict, aliases: list[tuple[str, str]]) -> Conversion:
    """``c`` making only the targets the load reads, plus the tied keys that take a target's
    value."""
    kept = [(t, shape) for t, shape in zip(c.targets, c.shapes) if t in outputs]
    kept += [(alias, c.shapes[c.targets.index(source)]) for alias, source in aliases]
    return dataclasses.replace(c, targets=tuple(t for t, _ in kept),
                               shapes=tuple(shape for _, shape in kept), aliases=tuple(aliases))


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
    if len(weight_map) == len(where):  # the index names every key of the headers: as they are
        return where
    # Tensors a file holds beyond what the index names are not part of the checkpoint. (Keys
    # interned, as the headers' are: one string object per name, see ModelTargets.)
    return {sys.intern(k): where[k] for k in weight_map}


def _check_parts(name: str, parts: Sequence[Part], target: TargetSpec, checkpoint, where) -> None:
    """The parts of ``name`` fill its shape exactly, from checkpoint tensors of a dtype that
    can stand for the model's."""
    if len(parts) == 1 and parts[0].box == parts[0].source_box:
        p = parts[0]
        if tuple(p.box[1]) != tuple(target.shape):
            via = "" if p.source == name else f" (read as model key {name!r})"
            raise DistShardError(
                f"shape mismatch for key {p.source!r}{via}: the checkpoint has {list(p.box[1])}, "
                f"the model expects {list(target.shape)}; build the model from the checkpoint's "
                "config", file=where[p.source], key=p.source)
    elif not tiles([p.box for p in parts], tuple(target.shape)) or (
            sum(p.numel for p in parts) != volume(target.shape)):
        sources = list(dict.fromkeys(p.source for p in parts))
        raise DistShardError(
            f"model key {name!r} of shape {list(target.shape)} cannot be formed from "
            f"{len(sources)} checkpoint tensor(s) {sources[:4]}: their boxes "
            f"{[list(p.box[1]) for p in parts[:4]]} do not fill it; build the model from the "
            "checkpoint's config", file=where[sources[0]], key=sources[0])
    for p in parts:
        dtype = checkpoint[p.source][1]
        if (dtype, target.dtype) not in _FINE:
            _check_dtype(where[p.source], p.source, dtype, name, target)


def _check_conversion(name: str, c: Conversion, target: TargetSpec, checkpoint, where) -> None:
    shape = c.shapes[c.targets.index(name)]
    if tuple(shape) != tuple(target.shape):
        raise DistShardError(
            f"shape mismatch for model key {name!r}: the conversion {c.name} of "
            f"{list(c.sources)[:4]} makes {list(shape)}, the model expects "
            f"{list(target.shape)}; build the model from the checkpoint's config",
            file=where[c.sources[0]], key=c.sources[0])
    for source in c.sources:
        _check_dtype(where[source], source, checkpoint[source][1], name, target)


# (checkpoint dtype, model dtype) pairs that _check_dtype accepts: it depends on them alone
_FINE: set[tuple[torch.dtype, torch.dtype]] = set()


def _check_dtype(file: str, key: str, dtype: torch.dtype, name: str, target: TargetSpec) -> None:
    if (dtype, target.dtype) in _FINE:
        return
    via = "" if key == name else f" (forming model key {name!r})"
    if dtype_kind(dtype) != dtype_kind(target.dtype):
        raise DistShardError(
            f"dtype mismatch for key {key!r}{via}: the checkpoint holds {dtype}, which cannot "
            f"stand for the model's {target.dtype} ({dtype_kind(dtype)} data for a "
            f"{dtype_kind(target.dtype)} tensor)", file=file, key=key)
    if is_float8(dtype) and dtype != target.dtype:
        raise DistShardError(
            f"key {key!r}{via} holds {dtype} data (a quantized checkpoint); converting it to the "
            f"model's {target.dtype} without its scales would give wrong values: build the model "
            "for that format (transformers' quantization support), or load a checkpoint in the "
            "model's dtype", file=file, key=key)
    _FINE.add((dtype, target.dtype))


def is_float8(dtype: torch.dtype) -> bool:
    return "float8" in str(dtype) or "float4" in str(dtype)


def refuse_unmatched(match: Match, initializable: frozenset[str] = frozenset()) -> None:
    """What ``match_checkpoint(strict=True)`` raises for a match made with ``strict=False``
    (``initializable``: as there; only its missing keys matter), or nothing when the checkpoint
    and the model match exactly."""
    _refuse(list(match.missing_keys), list(match.unexpected_keys), match.keymap, initializable)


def _refuse(missing: list[str], unexpected: list[str], keymap: KeyMap,
            initializable: frozenset[str]) -> None:
    if missing or unexpected:
        raise DistShardError(_strict_message(missing, unexpected, keymap, initializable),
                             key=(missing or unexpected)[0])


def _strict_message(missing: list[str], unexpected: list[str], keymap: KeyMap,
                    initializable: frozenset[str]) -> str:
    parts = ["the checkpoint does not match the model (strict=True)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    parts += explain(missing, unexpected, keymap)
    if missing and not set(missing) <= initializable:
        parts.append("strict=False would not help: the missing keys would stay on the meta "
                     "device (they have no initialisation distshard can run)")
    elif missing:
        parts.append("pass strict=False to initialise the missing keys as the model does (a new "
                     "head), and leave the unexpected ones unread; the report lists both")
    else:
        parts.append("pass strict=False to leave the unexpected keys unread; the report lists them")
    return "; ".join(parts)


def explain(missing: Sequence[str], unexpected: Sequence[str], keymap: KeyMap) -> list[str]:
    """The nearest explanation of keys that do not match, and what to pass.

    >>> explain(["model.a.w", "model.b.w"], ["a.w", "b.w"], KeyMap({}, (), (), {}))
    ["every unexpected key is a missing key without the prefix 'model.': pass key_mapping={'^': 'model.'}"]
    """
    out = []
    for pattern in keymap.unmatched_rules:
        out.append(f"key_mapping pattern {pattern!r} matched no checkpoint key")
    if missing and unexpected:
        out += _prefix_hint(missing, unexpected)
    return out


def _prefix_hint(missing: Sequence[str], unexpected: Sequence[str]) -> list[str]:
    gained = Counter(m[:-len(u)] for m in missing for u in unexpected
                     if m.endswith("." + u) or (m.endswith(u) and m[:-len(u)].endswith(".")))
    lost = Counter(u[:-len(m)] for m in missing for u in unexpected if u.endswith("." + m))
    for counts, text in ((gained, "a missing key without the prefix {p!r}: pass "
                                  "key_mapping={{'^': {p!r}}}"),
                         (lost, "a missing key with the extra prefix {p!r}: pass "
                                "key_mapping={{{q!r}: ''}}")):
        if counts:
            prefix, n = counts.most_common(1)[0]
            share = "every" if n == len(unexpected) else f"{n} of {len(unexpected)}"
            return [f"{share} unexpected key is " + text.format(p=prefix, q="^" + re.escape(prefix))]
    return []


def refuse_quantized(root: str, model) -> None:
    """A checkpoint whose ``config.json`` declares a ``quantization_config`` holds quantized
    data (and scales) that only a model built for that format reads correctly: refuse it for any
    other model, naming the file and the method."""
    path = os.path.join(root, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not quant:
        return
    # built for it: transformers gave the model a quantizer, or its tensors hold quantized
    # dtypes (a config.json naming the method is not enough: from_config copies it blindly)
    built = getattr(model, "hf_quantizer", None) is not None or any(
        is_float8(t.dtype) or t.dtype in (torch.int8, torch.uint8)
        for t in (*model.parameters(), *model.buffers()))
    if not built:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise DistShardError(
            f"the checkpoint is quantized ({method}: 'quantization_config' in its config.json); "
            "distshard does not dequantize, and loading its tensors into this model would give "
            "wrong values: build the model for that format, or load an unquantized checkpoint",
            file="config.json")
