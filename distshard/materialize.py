"""The model's side of a load: what it holds, where loaded values land, and the final swap.

Nothing here touches the model until :meth:`ModelTargets.commit`, which runs only after every
rank agreed that everything arrived; until then loaded values live in fresh tensors.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from dataclasses import dataclass, field
from operator import attrgetter

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .errors import DistShardError
from .keymap import whole
from .plan import Box, LoadPlan
from .record import paused_gc
from .validate import TargetSpec

__all__ = ["ModelTargets"]


@dataclass(slots=True)
class _Target:
    """One tensor object of the model and every (module, attribute) that holds it. ``box`` is
    the part this rank keeps: all of a plain tensor, the local shard of a DTensor."""

    names: list[str]
    tensor: torch.Tensor
    is_param: bool
    box: Box
    refs: list[tuple[torch.nn.Module, str]] = field(default_factory=list)

    @property
    def is_dtensor(self) -> bool:
        return isinstance(self.tensor, DTensor)

    def home(self, device: torch.device) -> torch.device:
        """Where its loaded value lives: ``device`` for a meta tensor, else beside the current
        value (a DTensor's local tensor)."""
        if _is_meta(self.tensor):
            return device
        return (self.tensor.to_local() if self.is_dtensor else self.tensor).device


def box_of(t: torch.Tensor, name: str, known: dict | None = None) -> Box:
    """The part of ``t`` this rank holds: a DTensor's local shard (``Shard`` and ``Replicate``
    placements; a ``Partial`` one holds no part of the values), a plain tensor whole.
    ``known``: the DTensor boxes found so far, by shape, mesh and placements, kept there (a
    model's DTensors share a few: torch's computation costs about 35 us per tensor)."""
    if not isinstance(t, DTensor):
        return whole(t.shape)
    layout = (t.shape, t.device_mesh, t.placements)
    if known is not None and layout in known:
        return known[layout]
    partial = [p for p in t.placements if p.is_partial()]
    if partial:
        raise DistShardError(
            f"{name!r} is a DTensor with a {partial[0]} placement: its local tensor is a part of "
            "a sum, not a part of the values; distshard loads and saves Shard and Replicate "
            "placements", key=name)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    box = tuple(offset), tuple(shape)
    if known is not None:
        known[layout] = box
    return box


def _dtensor_like(old: DTensor, local: torch.Tensor) -> DTensor:
    """A DTensor of ``old``'s mesh, placements, shape and stride whose local tensor is
    ``local`` (this rank's shard). Where the dtype is ``old``'s, it shares ``old``'s spec, as
    FSDP2 makes its own sharded parameters (``DTensor.from_local`` checks its arguments and
    builds a spec on every call: about 60 us, once per tensor of a load); else
    ``from_local``."""
    if local.dtype == old.dtype:
        return DTensor(local, old._spec, requires_grad=local.requires_grad)
    return DTensor.from_local(local, old.device_mesh, old.placements, run_check=False,
                              shape=old.shape, stride=old.stride())


def _as_parameter(made: DTensor, requires_grad: bool, marks: list[bool]) -> torch.Tensor:
    """``torch.nn.Parameter(made, requires_grad)`` for a DTensor just made (a leaf of no
    autograd graph). torch makes a tensor subclass a parameter by detaching it and marking the
    result (``_is_param``); the detach, a DTensor operation of about 25 us, changes nothing
    for such a tensor, so it is marked in place. ``marks`` (one list per load) holds whether
    that gives what torch's own gives, compared on the first DTensor parameter of the load
    (where a torch version does more, every one is made by torch)."""
    if made.grad_fn is not None or (marks and not marks[0]):
        return torch.nn.Parameter(made, requires_grad=requires_grad)
    theirs = None if marks else torch.nn.Parameter(
        DTensor(made._local_tensor, made._spec, requires_grad=False), requires_grad=requires_grad)
    made.requires_grad_(requires_grad)
    made._is_param = True
    if theirs is not None:
        marks.append(type(made) is type(theirs) and vars(made) == vars(theirs)
                     and made.requires_grad == theirs.requires_grad and made.is_leaf
                     and theirs.is_leaf and isinstance(made, torch.nn.Parameter))
        if not marks[0]:
            return theirs
    return made


def _whole_on_cpu(t: _Target) -> bool:
    tensor = t.tensor
    if isinstance(tensor, DTensor):
        return t.box == whole(tensor.shape) and tensor.device.type in ("cpu", "meta")
    return tensor.is_cpu or tensor.is_meta  # (a plain tensor's box is all of it)


def _is_meta(t: torch.Tensor) -> bool:
    if isinstance(t, DTensor):
        return t._local_tensor.is_meta  # (its device is its local tensor's: no device object)
    return t.is_meta


def _ties_known(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a transformers model that keeps the ties it declared at
    construction (``all_tied_weights_keys``), as transformers' own ``from_pretrained`` ties
    by them (``tie_weights(recompute_mapping=False)``; recomputing walks every module)."""
    return isinstance(getattr(model, "all_tied_weights_keys", None), dict) and \
        "recompute_mapping" in inspect.signature(model.tie_weights).parameters


def named_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``list(model.named_modules(remove_duplicate=False))``, in the same order, without a
    generator per level (about 3x faster on a model of 100,000 modules)."""
    out = []
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        out.append((prefix, module))
        children = module._modules
        if children:
            dot = prefix + "." if prefix else ""
            stack.extend(reversed([(dot + name, child) for name, child in children.items()
                                   if child is not None]))
    return out


class ModelTargets:
    """Parameters and persistent buffers of ``model``, grouped by tensor object (tied weights
    form one group), plus the non-persistent buffers, which are never loaded. Names are
    interned: the plan and the key lists name tensors with the same string objects, which a
    pickle then holds once."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        with paused_gc():
            self._collect(model, dtype)

    def _collect(self, model: torch.nn.Module, dtype: torch.dtype | None) -> None:
        self.model = model
        self.dtype = dtype
        self._specs: list[TargetSpec] | None = None
        self._whole_on_cpu: bool | None = None
        self.modules = named_modules(model)
        self._group(self.modules)
        tie = getattr(model, "tie_weights", None)
        if callable(tie) and not self.has_dtensors:
            # Hugging Face models re-tie here: construction under accelerate's
            # init_empty_weights leaves tied parameters as separate meta tensors. A sharded
            # model must be tied before fully_shard / parallelize_module, which see the ties.
            if _ties_known(model):  # transformers' own load ties by the mapping made at init
                tie(recompute_mapping=False)
            else:
                tie()
            if not self._still_held():  # tying replaced a parameter: group as the model is now
                self.modules = named_modules(model)
                self._group(self.modules)

    def _group(self, modules: list[tuple[str, torch.nn.Module]]) -> None:
        groups: dict[int, _Target] = {}
        extra: dict[int, _Target] = {}
        shards: dict[tuple, Box] = {}  # a DTensor's, one per shape, mesh and placements
        intern = sys.intern
        has_dtensors = False
        for prefix, module in modules:
            params, buffers = module._parameters, module._buffers
            if not params and not buffers:
                continue
            dot = prefix + "." if prefix else ""
            for entries, is_param in ((params, True), (buffers, False)):
                for name, t in entries.items():
                    if t is None:
                        continue
                    full = intern(dot + name)
                    table = (extra if not is_param and name in module._non_persistent_buffers_set
                             else groups)
                    target = table.get(id(t))
                    if target is not None:
                        target.names.append(full)
                        target.refs.append((module, name))
                        continue
                    if isinstance(t, DTensor):
                        box = box_of(t, full, shards)
                        has_dtensors = has_dtensors or table is groups
                    else:
                        box = whole(t.shape)
                    table[id(t)] = _Target([full], t, is_param, box, [(module, name)])
        self._groups, self._extra_buffers = groups, extra
        self.has_dtensors = has_dtensors
        self.by_name = {n: t for t in groups.values() for n in t.names}

    def _still_held(self) -> bool:
        """Whether every parameter grouped is still the one its module holds."""
        return all(module._parameters.get(name) is t.tensor for t in self._groups.values()
                   if t.is_param for module, name in t.refs)

    def target_dtype(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and t.dtype.is_floating_point else t.dtype

    def specs(self) -> list[TargetSpec]:
        """What the model holds, one spec per tensor group (made once: names, shapes and
        dtypes do not change during a load)."""
        if self._specs is None:
            with paused_gc():
                dtype = self.dtype
                self._specs = specs = []
                for t in self._groups.values():
                    tensor = t.tensor
                    # (a plain tensor's box is its shape, as a tuple, one per distinct shape)
                    shape = tuple(tensor.shape) if isinstance(tensor, DTensor) else t.box[1]
                    own = tensor.dtype
                    specs.append(TargetSpec(
                        tuple(t.names) if len(t.names) == 1 else tuple(sorted(t.names)), shape,
                        dtype if dtype is not None and own.is_floating_point else own))
        return self._specs

    def signature(self) -> int:
        """A 63-bit digest of names, shapes and dtypes, in name order: equal on ranks that built
        one model."""
        with paused_gc():
            rows = sorted(self.specs(), key=attrgetter("names"))
            digest = hashlib.sha256()
            digest.update("\n".join([",".join(s.names) for s in rows]).encode())
            digest.update(repr([s.shape for s in rows]).encode())
            digest.update(repr([s.dtype for s in rows]).encode())
        return int.from_bytes(digest.digest()[:8], "little") >> 1

    def boxes(self) -> dict[str, Box]:
        """This rank's box of every DTensor, under each of its names (plain tensors: whole)."""
        return {n: t.box for t in self._groups.values() if t.is_dtensor for n in t.names}

    # --- loading --------------------------------------------------------------------------

    def allocate(self, plan: LoadPlan, device: torch.device) -> dict[str, torch.Tensor]:
        """Fresh tensors for every key the plan loads, of this rank's local shape: on
        ``device`` for meta tensors, beside the current value for real ones."""
        dests = {}
        with paused_gc():
            for bucket in plan.buckets:
                for slot in bucket.slots:
                    if slot.key in dests:  # one of several slots (runs) of a tensor
                        continue
                    target = self.by_name[slot.key]
                    dests[slot.key] = torch.empty(target.box[1],
                                                  dtype=self.target_dtype(target.tensor),
                                                  device=target.home(device))
        return dests

    def all_whole_on_cpu(self) -> bool:
        """Whether this rank wants every tensor whole (no sharded DTensor) and on the CPU (or on
        meta, to land on the CPU). Found once (on several nodes rank 0 asks it twice)."""
        if self._whole_on_cpu is None:
            self._whole_on_cpu = all(map(_whole_on_cpu, self._groups.values()))
        return self._whole_on_cpu

    def whole_specs(self, plan: LoadPlan) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The dtype and shape every key of the plan loads to, when it is loaded whole."""
        out = {}
        with paused_gc():
            for b in plan.buckets:
                for s in b.slots:
                    if s.key not in out:
                        tensor = self.by_name[s.key].tensor
                        out[s.key] = (self.target_dtype(tensor), tuple(tensor.shape))
        return out

    def check_complete(self, loaded: set[str]) -> None:
        """Refuse to commit a model that would keep a tensor on meta."""
        left = sorted(n for t in self._groups.values() if _is_meta(t.tensor)
                      and loaded.isdisjoint(t.names) for n in t.names)
        left += sorted(n for t in self._extra_buffers.values() if _is_meta(t.tensor) for n in t.names)
        if left:
            raise DistShardError(
                f"{len(left)} tensor(s) would stay on the meta device: {', '.join(left)}. "
                "Non-persistent buffers (such as rotary inv_freq) are not in checkpoints, so the "
                "model must build them: construct it under accelerate.init_empty_weights() "
                "(parameters on meta, buffers real) rather than torch.device('meta'); a parameter "
                "missing from the checkpoint must be built on a real device (strict=False).",
                key=left[0])

    def commit(self, dests: dict[str, torch.Tensor], device: torch.device) -> None:
        """Swap the loaded values into the model. Meta tensors are replaced by new ones (every
        tied name gets the same object; a DTensor keeps its mesh, placements and global shape);
        real ones keep their identity, so optimizers and hooks that hold them stay valid.
        Buffers the checkpoint does not hold move to ``device``."""
        with paused_gc():
            self._commit(dests)
        for target in self._extra_buffers.values():
            if not target.is_dtensor and target.tensor.device != device:
                moved = target.tensor.to(device)
                for module, attr in target.refs:
                    module._buffers[attr] = moved
                target.tensor = moved

    def _commit(self, dests: dict[str, torch.Tensor]) -> None:
        parameter, marks = torch.nn.Parameter, []
        for target in self._groups.values():
            names = target.names
            key = names[0] if names[0] in dests else next((n for n in names if n in dests), None)
            if key is None:
                continue
            value, old = dests[key], target.tensor
            if not _is_meta(old):
                if target.is_dtensor:  # FSDP2 keeps views of the local tensor: write into it
                    with torch.no_grad():
                        old.to_local().copy_(value)
                else:
                    old.data = value
                continue
            if target.is_dtensor:
                value = _dtensor_like(old, value)
            if not target.is_param:
                new = value
            elif target.is_dtensor:
                new = _as_parameter(value, old.requires_grad, marks)
            else:
                new = parameter(value, requires_grad=old.requires_grad)
            for module, attr in target.refs:
                (module._parameters if target.is_param else module._buffers)[attr] = new
            target.tensor = new
