"""What ``distshard.save`` writes: each saved tensor, the boxes of model tensors it is made of,
and, on its writer, the tensor made from those boxes.

For a transformers model that is the layout transformers' ``save_pretrained`` writes (the hub
layout): transformers' own ``revert_weight_conversion`` names the saved tensors and gives their
shapes (run on meta tensors: no data), and the key mapping that loads that layout
(:mod:`distshard.hfkeys`) says which box of which model tensor each one holds -- a fused expert
tensor is saved as one tensor per expert, each the expert's box of it, so a writer gathers only
those boxes. Where a model tensor is made by an operation that is not a box, its saved tensors
are made by transformers' reverse operation on the whole model tensors (``group``). For any
other module every model tensor is saved whole, under its own name. Planning is pure, apart
from calling transformers on meta tensors; no collectives here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed.tensor import DTensor

from .boxes import intersect
from .errors import DistShardError
from .hfkeys import TransformersRules, is_transformers_model, own_classes
from .keymap import Box, contiguous_start, region, volume, whole
from .materialize import box_of
from .patterns import could_match
from .record import per_tensor

__all__ = ["Saved", "SavePiece", "Source", "assemble", "hub_layout", "local_box", "pieces_of"]


@per_tensor
class Source:
    """Box ``box`` of model tensor ``key`` fills box ``at`` of the saved tensor (contiguous in
    it, the same elements in the same order); ``at`` is None for a whole input of a group."""

    key: str
    box: Box
    at: Box | None


@per_tensor
class Saved:
    """One tensor of the saved checkpoint. ``group``: the index of the conversion whose
    reverse makes it from its sources, whole (None: it is the boxes of ``sources``)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sources: tuple[Source, ...]
    group: int | None = None


@per_tensor
class SavePiece:
    """Box ``box`` of model tensor ``key`` (a source of a saved tensor), which rank ``src``
    gives the saved tensor's writer (the writer itself when it holds it)."""

    source: int  # index into the saved tensor's sources
    key: str
    box: Box
    src: int


def hub_layout(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[Saved]:
    """The tensors to save for ``tensors`` (the model's, by name), in order."""
    identity = [Saved(k, t.dtype, box[1], (Source(k, box, box),))
                for k, t in tensors.items() for box in (whole(t.shape),)]
    if not is_transformers_model(model) or _kept_as_is(model, tensors):
        return identity
    from transformers.core_model_loading import revert_weight_conversion

    meta = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    try:
        with own_classes(model):  # transformers finds conversions by the model's own class
            hub = revert_weight_conversion(model, dict(meta))
    except Exception as e:
        raise DistShardError(f"transformers cannot name the tensors of {type(model).__name__} "
                             f"in the layout it saves ({type(e).__name__}: {e}); pass "
                             "layout='model' to save the model's own tensors") from e
    if {k: tuple(v.shape) for k, v in hub.items()} == {k: tuple(t.shape) for k, t in meta.items()}:
        return identity
    specs = {k: (tuple(t.shape), t.dtype) for k, t in meta.items()}
    # the rules that load this layout back: the transforms a load used (a user's key_mapping
    # among them), which are those transformers reverted, else the model's own
    rules = TransformersRules(model, transforms=getattr(model, "_weight_conversions", None))
    keymap = rules.map({k: (tuple(v.shape), v.dtype) for k, v in hub.items()}, specs)
    if keymap.unexpected or keymap.formed != set(meta):
        raise DistShardError(
            f"the layout transformers saves {type(model).__name__} in does not load back into "
            f"it (unmatched: {sorted(keymap.unexpected)[:4]}, not formed: "
            f"{sorted(set(meta) - keymap.formed)[:4]}); pass layout='model' to save the model's "
            "own tensors")
    sources: dict[str, list[Source]] = {}
    for parts in keymap.parts.values():
        for p in parts:
            sources.setdefault(p.source, []).append(Source(p.target, p.box, p.source_box))
    group_of = {}
    for i, c in enumerate(keymap.conversions):
        for k in c.sources:
            group_of[k] = i
            sources[k] = [Source(t, whole(specs[t][0]), None) for t in c.targets]
    out = []
    for key, value in hub.items():
        if key not in group_of and sum(volume(s.box[1]) for s in sources.get(key, ())) != volume(
                value.shape):
            raise DistShardError(f"saved tensor {key!r} is not filled by the model's tensors")
        out.append(Saved(key, value.dtype, tuple(value.shape), tuple(sources[key]),
                         group_of.get(key)))
    return out


def _kept_as_is(model: torch.nn.Module, keys) -> bool:
    """Whether transformers' ``revert_weight_conversion`` gives every key back as it is, shown
    cheaply: no key holds a pattern of the reverse of any transform it may apply (those a load
    used, and the model's registered ones; see :func:`distshard.patterns.could_match`). It makes
    and compiles one transform per key (about 0.2 ms each: 20 s for a model of 100,000 tensors)
    to give such keys back unchanged. False where that cannot be shown (or a transform has no
    reverse: ``revert_weight_conversion`` then says why)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    try:
        with own_classes(model):
            transforms = [*(getattr(model, "_weight_conversions", None) or ()),
                          *get_model_conversion_mapping(model, add_legacy=False)]
        found = could_match([t.reverse_transform() for t in transforms])
    except Exception:  # noqa: BLE001 (not shown: transformers' revert is asked, as before)
        return False
    return not any(map(found, keys))


def pieces_of(saved: Saved, boxes: list[dict[str, Box]] | None, writer: int,
              sharded: set[str]) -> tuple[SavePiece, ...]:
    """Where each source box of ``saved`` comes from: a plain (replicated) model tensor from the
    writer's own copy; a DTensor from each distinct local shard that meets the box (``boxes``:
    every rank's boxes), given by the writer when it holds that shard, else by its lowest
    holder."""
    out = []
    for i, source in enumerate(saved.sources):
        if source.key not in sharded:
            out.append(SavePiece(i, source.key, source.box, writer))
            continue
        holders: dict[Box, list[int]] = {}
        for rank, mine in enumerate(boxes):
            box = intersect(mine[source.key], source.box)
            if volume(box[1]):
                holders.setdefault(box, []).append(rank)
        out += [SavePiece(i, source.key, box, writer if writer in ranks else ranks[0])
                for box, ranks in holders.items()]
    return tuple(out)


def local_box(value: torch.Tensor, box: Box) -> torch.Tensor:
    """``box`` (global coordinates) of this rank's part of ``value``, contiguous."""
    if isinstance(value, DTensor):
        return value.to_local()[region(box, box_of(value, "")[0])].contiguous()
    return value[region(box)].contiguous()


def assemble(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], saved: Saved,
             pieces: tuple[SavePiece, ...], received: dict, rank: int,
             groups: dict) -> torch.Tensor:
    """Saved tensor ``saved``, on the CPU, on its writer: each source box filled from this
    rank's own pieces and those received (``received[key, piece]``); a conversion's output made
    by transformers' reverse operation on its sources, whole (cached in ``groups``)."""
    key = saved.key
    if saved.group is not None:
        if saved.group not in groups:
            whole = {s.key: _gather(tensors, saved, pieces, i, received, rank)
                     for i, s in enumerate(saved.sources)}
            from transformers.core_model_loading import revert_weight_conversion

            groups[saved.group] = revert_weight_conversion(model, whole)
        return groups[saved.group][key].to(saved.dtype)
    if len(saved.sources) == 1 and saved.sources[0].at == saved.sources[0].box and not isinstance(
            tensors[saved.sources[0].key], DTensor):
        return tensors[saved.sources[0].key]  # a plain tensor saved whole: no copy
    out = torch.empty(saved.shape, dtype=saved.dtype, device="cpu")
    flat = out.reshape(-1)
    for i, source in enumerate(saved.sources):
        start = contiguous_start(source.at, saved.shape)
        view = flat[start:start + volume(source.at[1])].view(source.box[1])
        view.copy_(_gather(tensors, saved, pieces, i, received, rank))
    return out


def _gather(tensors: Mapping[str, torch.Tensor], saved: Saved, pieces: tuple[SavePiece, ...],
            index: int, received: dict, rank: int) -> torch.Tensor:
    """Source ``index`` of ``saved`` (its box of a model tensor), from its pieces."""
    source, key = saved.sources[index], saved.key
    pieces = [p for p in pieces if p.source == index]
    if len(pieces) == 1 and pieces[0].box == source.box and pieces[0].src == rank:
        return local_box(tensors[source.key], source.box).cpu()
    out = torch.empty(source.box[1], dtype=tensors[source.key].dtype, device="cpu")
    for p in pieces:
        part = local_box(tensors[source.key], p.box) if p.src == rank else received[key, p]
        out[region(p.box, source.box[0])].copy_(part)
    return out
