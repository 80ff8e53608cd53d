"""Where each whole tensor lies in a node image (see :mod:`distshard.routes.node_image`), in
the parameter's dtype. Pure; the same on every rank."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..byteviews import ByteViews
from ..keymap import contiguous_start, region, volume
from ..plan import Bucket, LoadPlan, Slot, align

__all__ = ["ImageLayout"]


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Where each whole tensor lies in a node image, in the parameter's dtype. Same on every
    rank."""

    offset: dict[str, int]
    end: dict[str, int]  # where each tensor's bytes end
    dtype: dict[str, torch.dtype]
    shape: dict[str, tuple[int, ...]]
    nbytes: int
    # the run of each bucket of the plan laid out (id -> the bucket, its run): found once, where
    # checking the layout and moving the buckets both need it
    _runs: dict[int, tuple[Bucket, tuple[int, int] | None]] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, plan: LoadPlan,
           specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> ImageLayout:
        """Lay the tensors out in file order: a bucket of whole tensors, or of rows of one
        tensor, is then one run of bytes (:meth:`run`); buckets of boxes of fused tensors may
        not be."""
        offset, ends, end = {}, {}, 0
        for bucket in sorted(plan.buckets, key=_file_order):
            for slot in bucket.slots:
                if slot.key not in offset:
                    dtype, shape = specs[slot.key]
                    offset[slot.key] = align(end)
                    end = ends[slot.key] = offset[slot.key] + volume(shape) * dtype.itemsize
        layout = cls(offset, ends, {k: specs[k][0] for k in offset},
                     {k: specs[k][1] for k in offset}, end)
        layout._runs.update((id(b), (b, layout._run(b))) for b in plan.buckets)
        layout._check_runs()
        return layout

    def _check_runs(self) -> None:
        """Each bucket's run of bytes holds its own slots only: what crosses nodes is the run.
        (A node-local plan holds each bucket once per node: the same run.)"""
        runs = sorted({r for _, r in self._runs.values() if r is not None})
        if any(a[1] > b[0] for a, b in zip(runs, runs[1:])):
            raise AssertionError("internal error: buckets overlap in the node image")

    def _slot_range(self, slot: Slot) -> tuple[int, int] | None:
        """The image bytes of the slot's box, when the box is contiguous in its tensor."""
        key = slot.key
        if slot.shape == self.shape[key] and not any(slot.at):  # the whole tensor
            return self.offset[key], self.end[key]
        start = contiguous_start(slot.extent, self.shape[key])
        if start is None:
            return None
        size = self.dtype[slot.key].itemsize
        begin = self.offset[slot.key] + start * size
        return begin, begin + volume(slot.shape) * size

    def contiguous(self, slot: Slot) -> bool:
        """Whether the slot's box is one run of bytes in the image."""
        return self._slot_range(slot) is not None

    def run(self, bucket: Bucket) -> tuple[int, int] | None:
        """The bucket's slots as one run of image bytes: each slot contiguous, each next one
        right after the last (or, in another tensor, after the alignment between two whole
        tensors); None otherwise."""
        known = self._runs.get(id(bucket))
        if known is not None and known[0] is bucket:
            return known[1]
        return self._run(bucket)

    def _run(self, bucket: Bucket) -> tuple[int, int] | None:
        begin = end = last = None  # of the run so far, and the key of its last slot
        for slot in bucket.slots:
            r = self._slot_range(slot)
            if r is None:
                return None
            if last is None:
                begin = r[0]
            elif slot.key == last:
                if r[0] != end:
                    return None
            elif not (end == self.end[last] and r[0] == self.offset[slot.key] == align(end)):
                return None
            end, last = r[1], slot.key
        return begin, end

    def slot_bytes(self, data: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The bytes of ``slot``'s box, in the parameter's dtype (a box contiguous in its
        tensor: see :meth:`slot_view` for any)."""
        begin, end = self._slot_range(slot)
        return data[begin:end]

    def slot_view(self, data: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The slot's box of its tensor in the image, typed (strided where the box is)."""
        return self.tensor(data, slot.key)[region(slot.extent, None)]

    def tensor(self, data: torch.Tensor, key: str) -> torch.Tensor:
        o = self.offset[key]
        return data[o:self.end[key]].view(self.dtype[key]).view(self.shape[key])

    def tensors(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the image, each a view of ``data`` (one call each: see
        :class:`~distshard.byteviews.ByteViews`)."""
        views = ByteViews(data)
        return {k: views.at(o, self.dtype[k], self.shape[k]) for k, o in self.offset.items()}


def _file_order(bucket: Bucket) -> tuple:
    first = bucket.slots[0]
    return bucket.file, first.begin or 0, first.key, first.first
