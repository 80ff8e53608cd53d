"""Which checkpoint tensors form each model tensor. Pure: no files, no processes.

A model tensor is formed from checkpoint tensors by a rename, a stack along a new dimension
(one tensor per expert into one fused tensor), a concatenation (gate and up), a slice (a fused
``qkv`` cut in three) -- or, for anything else, an operation on whole checkpoint tensors.

The first four are boxes. Each :class:`Part` says: this box of a model tensor holds these
elements of one checkpoint tensor, a run that is contiguous in the checkpoint tensor and lies in
the same (row-major) order in the box. The plan reads a part like any tensor: a byte range of
its file; a rank that owns some of the box reads only the bytes of what it owns. The rest is a
:class:`Conversion`: one rank reads its sources whole and runs the operation, and the result
moves like any other tensor.

The algebra (:func:`leaf`, :func:`stack`, :func:`concat`, :func:`split`) describes tensors
symbolically, as parts, so that rules (transformers' conversion objects, a user's
``key_mapping``) can be planned without reading a byte:

>>> experts = [leaf(f"experts.{i}.w1", (4, 3)) for i in range(2)]
>>> fused = stack(experts, 0)
>>> fused.shape, [(p.source, p.box) for p in fused.parts]
((2, 4, 3), [('experts.0.w1', ((0, 0, 0), (1, 4, 3))), ('experts.1.w1', ((1, 0, 0), (1, 4, 3)))])
>>> q, k = split(leaf("qk", (6, 3)), 0, [4, 2])
>>> [(p.source, p.source_box, p.box) for p in k.parts]
[('qk', ((4, 0), (2, 3)), ((0, 0), (2, 3)))]
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .record import per_tensor

__all__ = [
    "Conversion",
    "Formed",
    "KeyMap",
    "MapBuilder",
    "MappingError",
    "Part",
    "RegexRules",
    "concat",
    "contiguous_start",
    "chunk_sizes",
    "leaf",
    "split",
    "stack",
    "region",
    "volume",
    "whole",
]

# The part of a tensor one rank keeps or one slot holds: (offset, shape) per dimension. A plain
# tensor's box is the whole tensor; a DTensor's is its local shard
# (``compute_local_shape_and_global_offset``).
Box = tuple[tuple[int, ...], tuple[int, ...]]


def whole(shape: Sequence[int]) -> Box:
    """The box of all of a tensor of ``shape``: one object per distinct shape (a model's many
    tensors share a few shapes; a plan or a save plan then pickles each box once).

    >>> whole((2, 3))
    ((0, 0), (2, 3))
    """
    return _whole(tuple(shape))


@functools.lru_cache(maxsize=4096)
def _whole(shape: tuple[int, ...]) -> Box:
    return (0,) * len(shape), shape


def region(box: Box, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
    """The index of ``box`` (whole-tensor coordinates) in a tensor whose first element is at
    ``origin`` (default: the whole tensor's).

    >>> region(((2, 1), (2, 3)), (2, 0))
    (slice(0, 2, None), slice(1, 4, None))
    """
    origin = origin or (0,) * len(box[0])
    return tuple(slice(o - z, o - z + n) for o, n, z in zip(box[0], box[1], origin))


def volume(shape: Sequence[int]) -> int:
    return math.prod(shape)


def contiguous_start(box: Box, shape: Sequence[int]) -> int | None:
    """The row-major index of the first element of ``box`` in a tensor of ``shape`` when the
    box is one contiguous run of it (leading dims of size 1, then one partial dim, then full
    dims), else None.

    >>> contiguous_start(((1, 0), (2, 3)), (4, 3)), contiguous_start(((0, 1), (4, 2)), (4, 3))
    (3, None)
    >>> contiguous_start(((2, 1, 0), (1, 2, 5)), (3, 4, 5))
    45
    """
    offset, size = box
    d = 0
    while d < len(shape) - 1 and size[d] == 1:
        d += 1
    if any(size[e] != shape[e] for e in range(d + 1, len(shape))):
        return None
    start = 0
    for o, s in zip(offset, shape):
        start = start * s + o
    return start


@per_tensor
class Part:
    """Box ``box`` of model tensor ``target`` holds box ``source_box`` of checkpoint tensor
    ``source``. Source dim ``k`` runs along target dim ``dims[k]`` (strictly increasing); every
    other target dim has size 1 in ``box``. So the two boxes hold the same elements in the same
    row-major order."""

    target: str
    box: Box
    source: str
    source_box: Box
    dims: tuple[int, ...]

    @property
    def numel(self) -> int:
        return volume(self.box[1])

    def restrict(self, dim: int, lo: int, hi: int) -> Part | None:
        """The part of this one inside ``lo <= index < hi`` along target dim ``dim`` (same
        target coordinates), or None where they do not meet."""
        (off, size), (soff, ssize) = self.box, self.source_box
        a, b = max(lo, off[dim]), min(hi, off[dim] + size[dim])
        if a >= b:
            return None
        box = (_put(off, dim, a), _put(size, dim, b - a))
        if dim in self.dims:
            k = self.dims.index(dim)
            source_box = (_put(soff, k, soff[k] + a - off[dim]), _put(ssize, k, b - a))
        else:
            source_box = self.source_box
        return replace(self, box=box, source_box=source_box)

    def shifted(self, dim: int, by: int) -> Part:
        off, size = self.box
        return replace(self, box=(_put(off, dim, off[dim] + by), size))


def _put(t: tuple[int, ...], i: int, v: int) -> tuple[int, ...]:
    return t[:i] + (v,) + t[i + 1:]


@dataclass(frozen=True, slots=True)
class Formed:
    """A tensor of ``shape`` described by the parts of checkpoint tensors it holds (parts not
    yet named: ``target`` is filled in by :meth:`named`)."""

    shape: tuple[int, ...]
    parts: tuple[Part, ...]

    def named(self, target: str) -> tuple[Part, ...]:
        return tuple(Part(target, p.box, p.source, p.source_box, p.dims) for p in self.parts)

    def contiguous_sources(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether every part is a contiguous run of its checkpoint tensor (a byte range)."""
        return all(contiguous_start(p.source_box, shapes[p.source]) is not None
                   for p in self.parts)


def leaf(key: str, shape: Sequence[int]) -> Formed:
    """Checkpoint tensor ``key`` as it is."""
    box = whole(shape)
    return Formed(box[1], (Part("", box, key, box, _identity_dims(len(box[1]))),))


_DIMS: dict[int, tuple[int, ...]] = {}


def _identity_dims(n: int) -> tuple[int, ...]:
    dims = _DIMS.get(n)
    if dims is None:
        dims = _DIMS[n] = tuple(range(n))
    return dims


def stack(items: Sequence[Formed], dim: int) -> Formed:
    """``torch.stack`` of ``items`` along a new dimension ``dim``."""
    shapes = {t.shape for t in items}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack tensors of shapes {sorted(shapes)}")
    (shape,) = shapes
    dim = _dim(dim, len(shape) + 1)
    parts = []
    for i, t in enumerate(items):
        for p in t.parts:
            (off, size) = p.box
            box = (off[:dim] + (i,) + off[dim:], size[:dim] + (1,) + size[dim:])
            parts.append(replace(p, box=box, dims=tuple(d + (d >= dim) for d in p.dims)))
    return Formed(shape[:dim] + (len(items),) + shape[dim:], tuple(parts))


def concat(items: Sequence[Formed], dim: int) -> Formed:
    """``torch.cat`` of ``items`` along ``dim``."""
    if not items:
        raise ValueError("cannot concatenate nothing")
    rank = len(items[0].shape)
    dim = _dim(dim, rank)
    rest = {t.shape[:dim] + t.shape[dim + 1:] for t in items}
    if len(rest) != 1 or any(len(t.shape) != rank for t in items):
        raise ValueError(f"cannot concatenate tensors of shapes {[t.shape for t in items]} "
                         f"along dim {dim}")
    parts, at = [], 0
    for t in items:
        parts.extend(p.shifted(dim, at) for p in t.parts)
        at += t.shape[dim]
    return Formed(_put(items[0].shape, dim, at), tuple(parts))


def split(item: Formed, dim: int, sizes: Sequence[int]) -> list[Formed]:
    """``torch.split(item, sizes, dim)``: one formed tensor per size."""
    dim = _dim(dim, len(item.shape))
    if sum(sizes) != item.shape[dim]:
        raise ValueError(f"cannot split {item.shape[dim]} along dim {dim} into {list(sizes)}")
    out, lo = [], 0
    for n in sizes:
        parts = []
        for p in item.parts:
            cut = p.restrict(dim, lo, lo + n)
            if cut is not None:
                parts.append(cut.shifted(dim, -lo))
        out.append(Formed(_put(item.shape, dim, n), tuple(parts)))
        lo += n
    return out


def chunk_sizes(n: int, chunks: int) -> list[int]:
    """The sizes ``torch.chunk`` gives: pieces of ``ceil(n / chunks)``, the last smaller, fewer
    pieces when they run out.

    >>> chunk_sizes(10, 3), chunk_sizes(6, 3), chunk_sizes(5, 4)
    ([4, 4, 2], [2, 2, 2], [2, 2, 1])
    """
    step = -(-n // chunks) if chunks else n
    return [min(step, n - lo) for lo in range(0, n, step)] if step else [0] * chunks


def _dim(dim: int, rank: int) -> int:
    if not -rank <= dim < max(rank, 1):
        raise ValueError(f"dim {dim} out of range for {rank} dimensions")
    return dim % rank if rank else 0


class MappingError(ValueError):
    """Rules that cannot map a checkpoint; ``key``: the checkpoint key to blame, if one is."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Conversion:
    """Model tensors ``targets`` computed from whole checkpoint tensors ``sources`` by an
    operation that is not a box (a transpose, a rope permutation, a model's own). ``op`` is
    opaque here: the rules that made it run it (:meth:`convert` of those rules)."""

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    name: str  # how the operation calls itself, for reports and errors
    shapes: tuple[tuple[int, ...], ...]  # of the targets, as the operation makes them
    op: Any = field(compare=False, repr=False)
    # (tied key, target) pairs: the tied key takes the target's value (a model sharded before
    # it was tied holds them apart)
    aliases: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class KeyMap:
    """Every model tensor a checkpoint forms, and what is left over on each side."""

    parts: dict[str, tuple[Part, ...]]  # model key -> its parts, for box-formed tensors
    conversions: tuple[Conversion, ...]
    unexpected: tuple[str, ...]  # checkpoint keys that form no model tensor
    renamed: dict[str, str]  # checkpoint key -> the model key it was mapped to (when it differs)
    unmatched_rules: tuple[str, ...] = ()  # user rules that renamed nothing

    @property
    def formed(self) -> set[str]:
        return set(self.parts) | {t for c in self.conversions for t in c.targets}

    def sources_of(self, target: str) -> tuple[str, ...]:
        """The checkpoint keys that form ``target``, in order."""
        if target in self.parts:
            return tuple(dict.fromkeys(p.source for p in self.parts[target]))
        for c in self.conversions:
            if target in c.targets:
                return c.sources
        return ()


class RegexRules:
    """A user's ``key_mapping={pattern: replacement}`` for any module: each pattern, in order,
    replaces its first match in a checkpoint key (``re.sub(..., count=1)``; groups as
    ``\\1``), and the result names a model tensor.

    >>> rules = RegexRules({r"^encoder\\.": "backbone.", r"\\.gamma$": ".weight"})
    >>> rules.rename("encoder.ln.gamma")
    'backbone.ln.weight'
    """

    def __init__(self, key_mapping: Mapping[str, str] | None = None) -> None:
        self.rules = []
        for pattern, replacement in (key_mapping or {}).items():
            try:
                self.rules.append((pattern, re.compile(pattern), replacement))
            except re.error as e:
                raise ValueError(f"key_mapping pattern {pattern!r} is not a valid regular "
                                 f"expression: {e}") from None
        self.used: set[str] = set()

    def rename(self, key: str) -> str:
        for pattern, compiled, replacement in self.rules:
            new = compiled.sub(replacement, key, count=1)
            if new != key:
                self.used.add(pattern)
            key = new
        return key

    def tied_sources(self) -> dict[str, str]:
        """Ties a module declares: none (a transformers model declares its own)."""
        return {}

    def map(self, checkpoint: Mapping[str, tuple], model_keys: Iterable[str]) -> KeyMap:
        """What each checkpoint key (-> (shape, dtype)) forms among ``model_keys``."""
        builder = MapBuilder(model_keys)
        for key in sorted(checkpoint):
            builder.add_leaf(self.rename(key), key, checkpoint[key][0])
        return builder.build(tuple(p for p, _, _ in self.rules if p not in self.used))


class MapBuilder:
    """Collects what rules form into a :class:`KeyMap`, refusing a model tensor formed twice."""

    def __init__(self, model_keys: Iterable[str]) -> None:
        self.model_keys = set(model_keys)
        self.parts: dict[str, tuple[Part, ...]] = {}
        self.conversions: list[Conversion] = []
        self.unexpected: list[str] = []
        self.renamed: dict[str, str] = {}
        self._by: dict[str, str] = {}  # model key -> the checkpoint key that first formed it
        self._wholes: dict[tuple[int, ...], tuple[Box, tuple[int, ...]]] = {}

    def add(self, target: str, formed: Formed, key: str) -> None:
        """``target`` is ``formed`` (checkpoint key ``key`` names the group, for errors)."""
        if target not in self.model_keys:
            self.unexpected.extend(dict.fromkeys(p.source for p in formed.parts))
            return
        target = sys.intern(target)  # the model's names are interned (see ModelTargets)
        self._claim(target, key)
        self.parts[target] = formed.named(target)
        for p in formed.parts:
            if p.source != target:
                self.renamed.setdefault(p.source, target)

    def add_leaf(self, target: str, key: str, shape: Sequence[int]) -> None:
        """``add(target, leaf(key, shape), key)``, without the intermediate objects."""
        if target not in self.model_keys:
            self.unexpected.append(key)
            return
        target = sys.intern(target)
        if target in self._by:
            self._claim(target, key)  # raises
        self._by[target] = key
        made = self._wholes.get(shape)  # (the box and dims of a shape: made once)
        if made is None:
            box = whole(shape)
            made = self._wholes[shape] = box, _identity_dims(len(box[1]))
        self.parts[target] = (Part(target, made[0], key, made[0], made[1]),)
        if key != target:
            self.renamed.setdefault(key, target)

    def add_conversion(self, conversion: Conversion) -> None:
        for target in conversion.targets:
            self._claim(target, conversion.sources[0])
        self.conversions.append(conversion)
        for source in conversion.sources:
            self.renamed.setdefault(source, conversion.targets[0])

    def _claim(self, target: str, key: str) -> None:
        if target in self._by:
            raise MappingError(f"checkpoint keys {self._by[target]!r} and {key!r} both form "
                               f"model key {target!r}", key)
        self._by[target] = key

    def build(self, unmatched_rules: tuple[str, ...] = ()) -> KeyMap:
        return KeyMap(self.parts, tuple(self.conversions), tuple(self.unexpected), self.renamed,
                      unmatched_rules)
