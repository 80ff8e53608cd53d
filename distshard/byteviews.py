"""Many tensors viewed in one buffer of bytes, one call each."""

from __future__ import annotations

import torch

__all__ = ["ByteViews"]


class ByteViews:
    """Tensors laid out in the bytes of ``data`` (a flat uint8 tensor), each made by one call:
    ``as_strided`` of ``data`` viewed as its dtype, where slicing the bytes and viewing them as
    the dtype, then the shape, makes three tensors (a view costs microseconds, and a load makes
    one per tensor: about 4 us against 10 per tensor here)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # data as each dtype
        self._strides: dict[tuple[int, ...], tuple[int, ...]] = {}  # one per distinct shape

    def at(self, begin: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The contiguous tensor of ``dtype`` and ``shape`` whose bytes start at byte ``begin``
        of ``data`` (a multiple of the dtype's size, as must be where ``data`` starts in its
        storage)."""
        size = dtype.itemsize
        if begin % size:
            raise ValueError(f"byte {begin} is not a multiple of {dtype}'s size, {size}")
        flat = self._typed.get(dtype)
        if flat is None:
            n = self.data.numel() // size * size
            flat = self._typed[dtype] = self.data[:n].view(dtype)
        stride = self._strides.get(shape)
        if stride is None:
            stride = self._strides[shape] = _contiguous_strides(shape)
        return flat.as_strided(shape, stride, flat.storage_offset() + begin // size)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
