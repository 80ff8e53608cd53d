"""Boxes of a tensor (an origin and a shape, as :data:`distshard.keymap.Box`): where two meet,
and whether the boxes the ranks hold of a DTensor cut it into parts. Pure."""

from __future__ import annotations

from .keymap import Box, volume

__all__ = ["intersect", "tiles", "untiled"]


def intersect(a: Box, b: Box) -> Box:
    """The common part of two boxes (zero-sized where they do not meet).

    >>> intersect(((0, 0), (4, 4)), ((2, 1), (4, 2)))
    ((2, 1), (2, 2))
    """
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x + m, y + n) for x, m, y, n in zip(a[0], a[1], b[0], b[1]))
    return lo, tuple(max(0, h - low) for low, h in zip(lo, hi))


def tiles(boxes, shape: tuple[int, ...], checked: dict | None = None) -> bool:
    """Whether the distinct non-empty ``boxes`` (one per rank; equal ones are copies) cut
    ``shape`` into parts: each inside it, along every dimension either the same stretch or
    stretches that do not meet (as Shard placements cut a tensor; so no two boxes overlap), and
    together as large as the tensor. ``checked``: the answers so far, by boxes and shape, kept
    there (the tensors of a model repeat a few).

    >>> tiles([((0, 0), (2, 3)), ((2, 0), (2, 3)), ((2, 0), (2, 3))], (4, 3))
    True
    >>> tiles([((0,), (4,)), ((1,), (4,))], (8,))  # interleaved rows reported as boxes
    False
    >>> checked = {}
    >>> [tiles(b, (8,), checked) for b in [[((0,), (4,)), ((4,), (4,))], [((0,), (4,))]] * 2]
    [True, False, True, False]
    >>> len(checked)
    2
    """
    if checked is not None:
        key = (tuple(boxes), shape)
        known = checked.get(key)
        if known is None:
            known = checked[key] = tiles(boxes, shape)
        return known
    distinct = {box for box in boxes if all(n > 0 for n in box[1])}
    if any(o < 0 or o + n > s for off, shp in distinct for o, n, s in zip(off, shp, shape)):
        return False
    for d in range(len(shape)):
        stretches = sorted({(off[d], shp[d]) for off, shp in distinct})
        if any(o + n > o2 for (o, n), (o2, _) in zip(stretches, stretches[1:])):
            return False
    return sum(volume(shp) for _, shp in distinct) == volume(shape)


def untiled(key: str, shape: tuple[int, ...]) -> str:
    """The error for a DTensor whose local shards do not :func:`tiles` its shape."""
    return (f"the local shards of DTensor {key!r} do not cut its shape {list(shape)} into "
            "parts, one box per rank (a placement such as _StridedShard on its own interleaves "
            "rows): distshard loads and saves Shard and Replicate placements")
