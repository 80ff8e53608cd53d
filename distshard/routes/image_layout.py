"""Where each whole tensor lies in a node image (see :mod:`distshard.routes.node_image`), in
the parameter's dtype. Pure; the same on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..keymap import contiguous_start, region, volume
from ..plan import Bucket, LoadPlan, Slot, align

__all__ = ["ImageLayout"]


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Where each whole tensor lies in a node image, in the parameter's dtype. Same on every
    rank."""

    offset: dict[str, int]
    dtype: dict[str, torch.dtype]
    shape: dict[str, tuple[int, ...]]
    nbytes: int

    @classmethod
    def of(cls, plan: LoadPlan,
           specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> ImageLayout:
        """Lay the tensors out in file order: a bucket of whole tensors, or of rows of one
        tensor, is then one run of bytes (:meth:`run`); buckets of boxes of fused tensors may
        not be."""
        offset, end = {}, 0
        for bucket in sorted(plan.buckets, key=_file_order):
            for slot in bucket.slots:
                if slot.key not in offset:
                    dtype, shape = specs[slot.key]
                    offset[slot.key] = align(end)
                    end = offset[slot.key] + volume(shape) * dtype.itemsize
        layout = cls(offset, {k: specs[k][0] for k in offset}, {k: specs[k][1] for k in offset},
                     end)
        layout._check_runs(plan)
        return layout

    def _check_runs(self, plan: LoadPlan) -> None:
        """Each bucket's run of bytes holds its own slots only: what crosses nodes is the run.
        (A node-local plan holds each bucket once per node: the same run.)"""
        runs = sorted({r for r in map(self.run, plan.buckets) if r is not None})
        if any(a[1] > b[0] for a, b in zip(runs, runs[1:])):
            raise AssertionError("internal error: buckets overlap in the node image")

    def _slot_range(self, slot: Slot) -> tuple[int, int] | None:
        """The image bytes of the slot's box, when the box is contiguous in its tensor."""
        start = contiguous_start(slot.extent, self.shape[slot.key])
        if start is None:
            return None
        size = self.dtype[slot.key].itemsize
        begin = self.offset[slot.key] + start * size
        return begin, begin + volume(slot.shape) * size

    def contiguous(self, slot: Slot) -> bool:
        """Whether the slot's box is one run of bytes in the image."""
        return self._slot_range(slot) is not None

    def _tensor_end(self, key: str) -> int:
        return self.offset[key] + volume(self.shape[key]) * self.dtype[key].itemsize

    def run(self, bucket: Bucket) -> tuple[int, int] | None:
        """The bucket's slots as one run of image bytes: each slot contiguous, each next one
        right after the last (or, in another tensor, after the alignment between two whole
        tensors); None otherwise."""
        ranges = [self._slot_range(s) for s in bucket.slots]
        if any(r is None for r in ranges):
            return None
        for s, t, (_, a1), (b0, _) in zip(bucket.slots, bucket.slots[1:], ranges, ranges[1:]):
            if s.key == t.key:
                if b0 != a1:
                    return None
            elif not (a1 == self._tensor_end(s.key) and b0 == self.offset[t.key] == align(a1)):
                return None
        return ranges[0][0], ranges[-1][1]

    def slot_bytes(self, data: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The bytes of ``slot``'s box, in the parameter's dtype (a box contiguous in its
        tensor: see :meth:`slot_view` for any)."""
        begin, end = self._slot_range(slot)
        return data[begin:end]

    def slot_view(self, data: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The slot's box of its tensor in the image, typed (strided where the box is)."""
        return self.tensor(data, slot.key)[region(slot.extent, None)]

    def bucket_bytes(self, data: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """The bucket's :meth:`run` of bytes."""
        begin, end = self.run(bucket)
        return data[begin:end]

    def tensor(self, data: torch.Tensor, key: str) -> torch.Tensor:
        o = self.offset[key]
        return data[o:self._tensor_end(key)].view(self.dtype[key]).view(self.shape[key])

    def tensors(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self.tensor(data, k) for k in self.offset}


def _file_order(bucket: Bucket) -> tuple:
    first = bucket.slots[0]
    return bucket.file, first.begin or 0, first.key, first.first
