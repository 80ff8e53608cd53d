"""New weights: model tensors the checkpoint does not hold (a new head), initialised as the
model initialises them, and identical on every rank.

Every rank runs the same initialisation of the same tensors from the same seed (rank 0's
``torch.initial_seed()``, so ``torch.manual_seed`` on rank 0 makes it repeatable; sent with the
plan; each module is seeded from it and the module's name; no generator of the caller is
advanced or reseeded). No byte moves, and every rank
holds the same values: a DDP job needs no initial sync, and a sharded weight is consistent slices
of one tensor (each rank makes the whole tensor on the CPU and keeps its box).

How a module is initialised: for a transformers model, by its own ``_init_weights`` (that of the
module's nearest ``PreTrainedModel``, as transformers' ``initialize_weights`` dispatches), under
transformers' initialisation guards, as transformers initialises missing keys; for any other
module, by its ``reset_parameters()``. The module sees its missing tensors as real, whole CPU
tensors and its other tensors as meta placeholders flagged as initialised (the guards skip them),
so nothing loaded is touched; its own tensors are put back afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import torch

from .keymap import region

__all__ = ["Initializer", "initializable", "initialize_missing", "module_seed", "unwritten"]


def module_seed(seed: int, module_name: str) -> int:
    """The seed of one module: the same on every rank, whatever else is initialised.

    >>> module_seed(7, "score") == module_seed(7, "score") != module_seed(7, "classifier")
    True
    """
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Initializer:
    """Which modules of ``model`` distshard can initialise, and how."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._hf_owner = _nearest_pretrained(model)

    def can_initialize(self, module_name: str, module: torch.nn.Module) -> bool:
        return self._hf_owner.get(module_name) is not None or callable(
            getattr(module, "reset_parameters", None))

    def initialize(self, module_name: str, module: torch.nn.Module,
                   missing: dict[str, tuple[tuple[int, ...], torch.dtype, bool]],
                   seed: int) -> dict[str, torch.Tensor]:
        """Initialise the attributes ``missing`` of ``module`` (attr -> (shape, dtype,
        is_param)) from ``seed``; return their values, whole, on the CPU. The module is left as
        it was. Elements the initialisation does not write (transformers would leave whatever
        memory held there) are 0, the same on every rank: see :func:`unwritten`."""
        owner = self._hf_owner.get(module_name)
        run: Callable[[torch.nn.Module], object] = (
            owner._init_weights if owner is not None else type(module).reset_parameters)
        saved = dict(module._parameters), dict(module._buffers)
        try:
            _swap(module, missing)
            # the CPU generator only (torch.manual_seed would reseed every CUDA device too), put
            # back as it was: a load leaves the caller's random state alone
            with torch.random.fork_rng(devices=[]), torch.no_grad(), _guards():
                torch.default_generator.manual_seed(module_seed(seed, module_name))
                run(module)
            values = {}
            for attr, (_, _, is_param) in missing.items():
                held = (module._parameters if is_param else module._buffers).get(attr)
                values[attr] = held.detach() if held is not None else None
        finally:
            module._parameters.clear()
            module._parameters.update(saved[0])
            module._buffers.clear()
            module._buffers.update(saved[1])
        return values


def initializable(targets, names, initializer: Initializer) -> frozenset[str]:
    """Which of ``names`` (keys of ``targets``, a :class:`~distshard.materialize.ModelTargets`)
    a non-strict load initialises: every name of each tensor group whose module can be."""
    out = set()
    for module_name, module, held in _owners(targets, names).values():
        if initializer.can_initialize(module_name, module):
            out.update(n for _, t in held for n in t.names)
    return frozenset(out)


def initialize_missing(targets, names, seed: int, device: torch.device,
                       initializer: Initializer) -> tuple[dict[str, torch.Tensor], list[str]]:
    """This rank's value of each tensor group of ``targets`` named (one name per group):
    initialised whole from ``seed`` on the CPU (the same on every rank), then its box, on
    ``device`` for meta tensors (beside the current value for real ones). Also the names whose
    initialisation left elements unwritten (made 0)."""
    out, holes = {}, []
    for module_name, module, held in _owners(targets, names).values():
        missing = {attr: (tuple(t.tensor.shape), targets.target_dtype(t.tensor), t.is_param)
                   for attr, t in held}
        values = initializer.initialize(module_name, module, missing, seed)
        for attr, target in held:
            value = values[attr]
            if value is None:
                continue
            if unwritten(value):
                holes.append(target.names[0])
            local = value[region(target.box)]
            out[target.names[0]] = local.to(target.home(device)).contiguous()
    return out, holes


def _owners(targets, names) -> dict[int, tuple[str, torch.nn.Module, list]]:
    """The tensor groups of ``names`` by the module that holds each (its first holder), with
    that module's name and the (attribute, group) pairs it holds."""
    out: dict[int, tuple[str, torch.nn.Module, list]] = {}
    for name in names:
        target = targets.by_name[name]
        module, attr = target.refs[target.names.index(name)]
        out.setdefault(id(module), (name.rpartition(".")[0], module, []))[2].append(
            (attr, target))
    return out


def unwritten(value: torch.Tensor) -> bool:
    """Whether an initialised value had elements its initialisation did not write (left NaN);
    they are set to 0 here."""
    if not value.is_floating_point():
        return False
    holes = torch.isnan(value)
    if not bool(holes.any()):
        return False
    value.masked_fill_(holes, 0)
    return True


def _swap(module: torch.nn.Module,
          missing: dict[str, tuple[tuple[int, ...], torch.dtype, bool]]) -> None:
    """Real, whole CPU tensors for the ``missing`` attributes; for the others, meta
    placeholders flagged as initialised (transformers' guards skip them)."""
    for table, is_param in ((module._parameters, True), (module._buffers, False)):
        for attr, old in list(table.items()):
            if attr in missing:
                shape, dtype, _ = missing[attr]
                # NaN where the initialisation writes nothing: found, and made 0, afterwards
                new = torch.full(shape, float("nan") if dtype.is_floating_point else 0, dtype=dtype)
            elif old is None:
                continue
            else:
                new = torch.empty(old.shape, dtype=old.dtype, device="meta")
                new._is_hf_initialized = True
            table[attr] = torch.nn.Parameter(new, requires_grad=False) if is_param else new


def _guards():
    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError:
        return contextlib.nullcontext()
    return guard_torch_init_functions()


def _nearest_pretrained(model: torch.nn.Module) -> dict[str, torch.nn.Module | None]:
    """Module name -> the nearest transformers ``PreTrainedModel`` at or above it (None for
    modules outside any)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return {}
    out: dict[str, torch.nn.Module | None] = {}

    def walk(prefix: str, module: torch.nn.Module, owner) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        out.setdefault(prefix, owner)
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child, owner)

    walk("", model, None)
    return out
