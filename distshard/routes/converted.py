"""A bucket made by a conversion (an operation on whole checkpoint tensors, such as
transformers' fused layouts it cannot read as boxes): its reader reads every source whole, runs
the operation (``reader.convert``: transformers' own), and places each model tensor it makes in
its slot. The bucket then moves as any other (broadcast, slices or a node's image). Sources and
results are staged whole on the reader."""

from __future__ import annotations

import torch

from ..errors import DistShardError
from ..plan import Bucket

__all__ = ["read_converted"]


def read_converted(reader, bucket: Bucket, views: list[torch.Tensor]) -> None:
    """Fill ``views[i]`` with slot ``i`` of conversion bucket ``bucket``, read by ``reader``
    (a :class:`distshard.reader.ShardReader`)."""
    tensors = {}
    for src in bucket.sources:
        tensors[src.key] = torch.empty(src.shape, dtype=src.dtype)
        reader.read_source(src, tensors[src.key])
    c = bucket.conversion
    try:
        made = reader.convert(c, tensors)
    except Exception as e:
        raise DistShardError(
            f"the conversion {c.name} of {list(c.sources)[:4]}... into {list(c.targets)} "
            f"failed: {type(e).__name__}: {e}", file=bucket.file, key=c.sources[0]) from e
    for slot, view in zip(bucket.slots, views):
        value = made.get(slot.key)
        if value is None or tuple(value.shape) != slot.shape:
            raise DistShardError(
                f"the conversion {c.name} gave {None if value is None else list(value.shape)} "
                f"for {slot.key!r}, planned {list(slot.shape)}", key=slot.key)
        view.view(slot.dtype).view(slot.shape).copy_(value)
