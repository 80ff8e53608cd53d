"""transformers' own key conversions, planned as boxes where they are boxes.

For a transformers model the rules that put a checkpoint's keys onto the model are transformers':
``get_model_conversion_mapping(model, key_mapping)`` (the conversions registered for the model and
its sub-models, the legacy renames, a user's ``key_mapping``), applied key by key with
``rename_source_key`` (renames, then at most one converter, then the base-model prefix added or
stripped), in the order and with the fallback its own loader uses. None of those rules is copied
here: a new architecture works as soon as transformers knows it.

What distshard adds is a reading of each converter's operations as boxes
(:mod:`distshard.keymap`): ``MergeModulelist`` is a stack, ``Concatenate`` a concatenation,
``Chunk`` and ``Split`` slices. A group whose operations are all of these, and whose box reading
names and shapes exactly what transformers' own ``convert`` gives on meta tensors, is read as
byte ranges; any other (a transpose, a rope permutation, a model's own operation) becomes a
:class:`~distshard.keymap.Conversion`, run by transformers' own ``convert`` on the sources read
whole (:meth:`TransformersRules.convert`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

import torch

from .keymap import (
    Conversion,
    Formed,
    KeyMap,
    MapBuilder,
    MappingError,
    chunk_sizes,
    concat,
    leaf,
    split,
    stack,
)
from .materialize import named_modules
from .patterns import could_match

__all__ = ["TransformersRules", "is_transformers_model", "keep_used", "own_class",
           "own_classes"]

Spec = tuple[tuple[int, ...], torch.dtype]


def is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


class TransformersRules:
    """The conversions transformers applies when it loads a checkpoint into ``model``."""

    def __init__(self, model: torch.nn.Module, key_mapping: Mapping[str, str] | None = None,
                 transforms: list | None = None, modules: list | None = None) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        self.key_mapping = dict(key_mapping or {}) if transforms is None else {}
        if transforms is None:  # else: given (those a load used), fresh copies of them
            with own_classes(model, modules):
                transforms = get_model_conversion_mapping(model, key_mapping=key_mapping or None)
        else:
            transforms = copy.deepcopy(list(transforms))
        self.transforms = transforms
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._user = self.renamings[:len(self.key_mapping)]  # listed first by transformers
        self._by_pattern = {p: i for i, c in enumerate(self.converters) for p in c.source_patterns}

    # --- planning (rank 0) ----------------------------------------------------------------

    def map(self, checkpoint: Mapping[str, Spec], model: Mapping[str, Spec]) -> KeyMap:
        """What each checkpoint key forms in ``model`` (keys -> (shape, dtype) on both sides)."""
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        present = dict.fromkeys(model, True)  # rename_source_key asks .get(key) is not None
        builder = MapBuilder(model)
        prefix, could_match = self.model.base_model_prefix, self._could_match()
        grouped = []
        for key in checkpoint:
            target = None
            if could_match(key):
                target, pattern = rename_source_key(key, self.renamings, self.converters,
                                                    prefix, present)
            if target is None or (target not in present and key in present):
                # no rule applies to the key, or transformers' own fallback: the base-model
                # prefix step alone
                target, pattern = rename_source_key(key, [], [], prefix, present)
            if pattern is None or target not in present:
                builder.add_leaf(target, key, checkpoint[key][0])
            else:
                grouped.append((key, target, pattern))
        # a converter's sources in the order transformers collects them (the order they are
        # stacked or concatenated in)
        groups: dict[str, tuple[int, dict[str, list[str]]]] = {}
        order = _natural_order(dot_natural_key)
        for key, target, pattern in sorted(grouped, key=lambda row: order(row[0])):
            _, collected = groups.setdefault(target, (self._by_pattern[pattern], {}))
            collected.setdefault(pattern, []).append(key)
        for layer, (index, collected) in groups.items():
            self._plan_group(builder, layer, index, collected, checkpoint, model)
        unmatched = tuple(k for k, t in zip(self.key_mapping, self._user) if not t.was_used())
        return builder.build(unmatched)

    def _could_match(self):
        """A test that is False for a key no transform can rename (see
        :func:`distshard.patterns.could_match`)."""
        return could_match([*self.renamings, *self.converters])

    def _plan_group(self, builder: MapBuilder, layer: str, index: int,
                    collected: dict[str, list[str]], checkpoint: Mapping[str, Spec],
                    model: Mapping[str, Spec]) -> None:
        converter = self.converters[index]
        keys = [k for ks in collected.values() for k in ks]
        op = (index, layer, tuple((p, tuple(ks)) for p, ks in collected.items()))
        expected = self._on_meta(op, checkpoint, model[layer][1])
        formed = self._as_boxes(converter, layer, collected, checkpoint, model)
        shapes = {k: checkpoint[k][0] for k in keys}
        if formed is not None and {k: f.shape for k, f in formed.items()} == expected and all(
                f.contiguous_sources(shapes) for f in formed.values()):
            for target, f in formed.items():
                builder.add(target, f, keys[0])
            return
        name = " + ".join(type(o).__name__ for o in converter.operations)
        targets = tuple(t for t in expected if t in builder.model_keys)
        builder.unexpected.extend(k for k in keys if not targets)
        if targets:
            builder.add_conversion(Conversion(targets, tuple(keys), name,
                                              tuple(expected[t] for t in targets), op))

    def _as_boxes(self, converter, layer: str, collected: dict[str, list[str]],
                  checkpoint: Mapping[str, Spec],
                  model: Mapping[str, Spec]) -> dict[str, Formed] | None:
        """The group's operations read as boxes, under the names ``convert`` gives; None when
        an operation is not a box."""
        from transformers.core_model_loading import (
            Chunk,
            Concatenate,
            MergeModulelist,
            Split,
            Transpose,
        )

        values: dict[str, Any] = {p: [leaf(k, checkpoint[k][0]) for k in ks]
                                  for p, ks in collected.items()}
        sources, targets = converter.source_patterns, converter.target_patterns
        try:
            for op in converter.operations:
                kind = type(op)
                if kind is MergeModulelist:
                    n = len(values)
                    values = {op.get_target_pattern(n, p, targets): stack(ts, op.dim)
                              for p, ts in values.items()}
                elif kind is Concatenate:
                    items = [t for p in sources if p in values
                             for t in (values[p] if isinstance(values[p], list) else [values[p]])]
                    values = {op.get_target_pattern(targets): concat(items, op.dim)}
                elif kind in (Chunk, Split):
                    item = _single(values)
                    if kind is Chunk:
                        names = op.get_target_patterns(targets, config=self.model.config)
                        sizes = chunk_sizes(item.shape[op.dim], len(names))
                    else:
                        names = targets
                        sizes = [model[layer.replace(targets[0], t)][0][op.dim] for t in names]
                    values = dict(zip(names, split(item, op.dim, sizes)))
                elif (kind is Transpose and op.check_dims
                      and _single(values).shape == model[layer][0]):
                    values = {op.get_target_pattern(values, sources, targets): _single(values)}
                else:  # (a Transpose that transposes is not a box)
                    return None
        except (ValueError, KeyError, IndexError):
            return None
        values = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v)
                  for k, v in values.items()}
        if not all(isinstance(v, Formed) for v in values.values()):
            return None
        return {name: values[k] for k, name in _full_names(layer, values).items()}

    def _on_meta(self, op, checkpoint: Mapping[str, Spec], dtype: torch.dtype) -> dict[str, tuple]:
        """Names and shapes transformers' own ``convert`` gives the group, run on meta tensors."""
        tensors = {k: torch.empty(checkpoint[k][0], dtype=_cast(checkpoint[k][1], dtype),
                                  device="meta") for _, ks in op[2] for k in ks}
        try:
            out = self._run(op, tensors)
        except Exception as e:
            odd = _odd_one_out({k: checkpoint[k][0] for k in tensors}, op[2])
            blame = f"; {odd!r} differs from the others in shape" if odd else ""
            raise MappingError(
                f"transformers' conversion {self._describe(op)} into {op[1]!r} cannot be "
                f"planned from {len(tensors)} checkpoint tensor(s){blame}: "
                f"{type(e).__name__}: {e}", odd or next(iter(tensors))) from None
        return {k: tuple(v.shape) for k, v in out.items()}

    def _describe(self, op) -> str:
        converter = self.converters[op[0]]
        return (f"{converter.source_patterns} -> {converter.target_patterns} "
                f"({', '.join(type(o).__name__ for o in converter.operations)})")

    # --- running a conversion (the rank that read its sources) -------------------------------

    def convert(self, conversion: Conversion, tensors: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """transformers' own ``convert`` of ``conversion`` on its sources (checkpoint key ->
        tensor, already in the model's dtype)."""
        return self._run(conversion.op, tensors)

    def _run(self, op, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index, layer, collected = op
        converter = copy.deepcopy(self.converters[index])
        for pattern, keys in collected:
            for key in keys:
                converter.add_tensor(layer, key, pattern, tensors[key])
        with torch.no_grad():
            out = converter.convert(layer, model=self.model, config=self.model.config)
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}

    def used(self) -> list:
        """The transforms that matched a checkpoint key in :meth:`map` (picklable: rank 0 sends
        them to the others, which keep them on their models; see :func:`keep_used`)."""
        return [t for t in self.transforms if t.was_used()]

    # --- ties -------------------------------------------------------------------------------

    def tied_sources(self) -> dict[str, str]:
        """``{tied key: the key it takes its value from}``, as the model (and its config's
        ``tie_word_embeddings``) declared them when it was built, which is what transformers'
        own loader ties by."""
        known = getattr(self.model, "all_tied_weights_keys", None)
        if isinstance(known, dict):  # made at construction; what from_pretrained ties by
            return dict(known)
        expand = getattr(self.model, "get_expanded_tied_weights_keys", None)
        return dict(expand(all_submodels=True)) if callable(expand) else {}


def keep_used(model: torch.nn.Module, transforms: list) -> None:
    """Keep the transforms a load used on the model, as transformers' loader does: its
    ``save_pretrained`` (and :func:`distshard.save`) then writes the layout that was loaded back
    (a fused checkpoint stays fused; one tensor per expert stays so)."""
    model._weight_conversions = list(transforms)


def own_class(module: torch.nn.Module) -> type:
    """The module's class before ``fully_shard`` or ``replicate`` wrapped it
    (``FSDPLlamaForCausalLM`` -> ``LlamaForCausalLM``)."""
    return next((c for c in type(module).__mro__
                 if not c.__module__.startswith("torch.distributed")), type(module))


@contextlib.contextmanager
def own_classes(model: torch.nn.Module, modules: list | None = None):
    """The model as transformers' conversion lookup should see it, while the lookup runs.

    transformers finds a model's conversions by class name; ``fully_shard`` (and ``replicate``)
    give a wrapped module a class of their own (``FSDPLlamaForCausalLM``, a subclass of
    ``LlamaForCausalLM``): each such module has its own class back. The lookup walks
    ``model.named_modules()``, a generator per module (0.3 s on 125,000 modules): that call
    lists the same pairs, in the same order, from ``modules`` (the model's ``(name, module)``
    pairs with duplicates, as :func:`~distshard.materialize.named_modules` gives them, if the
    caller has them), unless a module walks its modules its own way (its class, or the module
    itself, defines ``named_modules``) or tells modules apart otherwise than by identity (its
    class defines ``__eq__`` or ``__hash__``, which torch's walk uses)."""
    swapped, owns = [], {}  # class -> its own (one lookup per class, not per module)
    if modules is None:
        modules = named_modules(model)
    listing = functools.partial(_listed_modules, model, modules)
    try:
        listed = True
        for _, module in modules:  # (a module listed twice is swapped once: then it is its own)
            cls = type(module)
            own = owns.get(cls)
            if own is None:
                own = owns[cls] = own_class(module)
                listed = listed and _walked_by_torch(cls)
            if own is not cls:
                swapped.append((module, cls))
                module.__class__ = own
            if "named_modules" in module.__dict__:
                listed = False
        if listed:  # (an instance attribute, set as such: no parameter or child by that name)
            model.__dict__["named_modules"] = listing
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        if model.__dict__.get("named_modules") is listing:
            del model.__dict__["named_modules"]


def _walked_by_torch(cls: type) -> bool:
    return (cls.named_modules is torch.nn.Module.named_modules
            and cls.__eq__ is object.__eq__ and cls.__hash__ is object.__hash__)


def _listed_modules(model: torch.nn.Module, modules: list, *args, **kwargs):
    """``model.named_modules(*args, **kwargs)``; with no arguments, from ``modules``, each
    module once (the first time it is listed: where torch's walk meets it first)."""
    if args or kwargs:
        return torch.nn.Module.named_modules(model, *args, **kwargs)
    if len(set(map(id, map(itemgetter(1), modules)))) == len(modules):  # none listed twice
        return iter(modules)
    seen: set[int] = set()
    return iter([(name, m) for name, m in modules if id(m) not in seen and not seen.add(id(m))])


def _odd_one_out(shapes: Mapping[str, tuple[int, ...]], collected) -> str | None:
    """Of tensors collected under one pattern (experts, say), the first whose shape is not the
    most common one: the likeliest cause of a conversion that fails."""
    for _, keys in collected:
        counts: dict[tuple[int, ...], int] = {}
        for k in keys:
            counts[shapes[k]] = counts.get(shapes[k], 0) + 1
        if len(counts) > 1:
            common = max(counts, key=counts.get)
            return next(k for k in keys if shapes[k] != common)
    return None


def _natural_order(dot_natural_key):
    """transformers' ``dot_natural_key``, each dotted part's key computed once: the key of a
    dotted name is the list of its parts' keys (parts are keyed one by one), and the parts of
    a checkpoint's names repeat (``model``, ``layers``, ``12``)."""

    class Parts(dict):
        def __missing__(self, part: str):
            k = self[part] = dot_natural_key(part)[0]
            return k

    part_key = Parts().__getitem__
    return lambda name: list(map(part_key, name.split(".")))


def _single(values: dict[str, Any]):
    """The one value an operation on a single input gets."""
    if len(values) != 1:
        raise ValueError("more than one input")
    (item,) = values.values()
    return item[0] if isinstance(item, list) else item


def _cast(source: torch.dtype, target: torch.dtype) -> torch.dtype:
    """transformers casts a floating source to the model's dtype before converting it."""
    return target if source.is_floating_point and target.is_floating_point else source


def _full_names(layer: str, values: Mapping[str, Any]) -> dict[str, str]:
    """Pattern -> full key, as ``WeightConverter.convert`` expands the names its operations
    return: the prefix and suffix around the first of them found in the layer's name."""
    full = layer.replace("*.", "0.") if "*." in layer else layer
    for k in values:
        if k in full:
            prefix, _, suffix = full.partition(k)
            return {name: prefix + name + suffix for name in values}
    return {name: name for name in values}
