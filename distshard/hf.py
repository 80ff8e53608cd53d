"""``from_pretrained``: a Hugging Face model class and a local checkpoint folder in, a loaded
model out — the transformers call, with the weights loaded by :func:`distshard.load`.

    model = from_pretrained(AutoModelForCausalLM, "/ckpt/llama")            # replicated
    model = from_pretrained(AutoModelForCausalLM, "/ckpt/llama",            # FSDP2
                            device_mesh=init_device_mesh("cuda", (8,)))

Collective: every rank of ``group`` calls it with the same arguments. The model is built with
its parameters on the meta device (no memory, no random initialisation) and its buffers real,
tied, optionally sharded while still on meta, and then loaded. Every step that can fail on one
rank only (a missing ``config.json`` on one node, a sharding callback that raises) ends in an
agreement, so that every rank raises the same :class:`DistShardError` instead of leaving the
others waiting in the load.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .comm import Comm, failure_of
from .errors import DistShardError
from .index import describe_file, find_checkpoint
from .loader import DEFAULT_TIMEOUT, load
from .report import LoadReport
from .validate import is_float8

__all__ = ["average_replicated_grads", "fsdp2_by_layer", "from_pretrained"]

logger = logging.getLogger("distshard")

ShardFn = Callable[[torch.nn.Module, Any], Any]


def fsdp2_by_layer(model: torch.nn.Module, device_mesh) -> None:
    """FSDP2 as transformers' own FSDP plans it: ``fully_shard`` on every module whose class is
    in the model's ``_no_split_modules`` (the decoder / encoder layers), then on the root.
    The default ``shard`` of :func:`from_pretrained` when only ``device_mesh`` is given.

    Call it on a tied model: tied weights are then one parameter, which FSDP2 shards once and
    keeps tied -- within one ``fully_shard`` unit, so a layer holding a weight tied to one
    outside it (RoBERTa's embeddings, tied to its decoder) is left to the root's unit. Scalar
    parameters (CLIP's ``logit_scale``), which ``fully_shard`` refuses, stay plain tensors,
    replicated on every rank (loaded whole); once the model is loaded,
    :func:`average_replicated_grads` makes their gradients the mean over the mesh, as FSDP2
    makes the others' (:func:`from_pretrained` calls it)."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    scalars = {p for p in model.parameters() if p.dim() == 0}
    holders: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(name)
    for name, module in model.named_modules():
        if module is model or type(module).__name__ not in layer_classes:
            continue
        if any(h != name and not h.startswith(name + ".")
               for p in module.parameters() for h in holders[id(p)]):
            continue  # a weight tied to one outside the layer: it stays in the root's unit
        mine = {p for p in module.parameters() if p in scalars}
        fully_shard(module, mesh=device_mesh, ignored_params=mine or None)
    fully_shard(model, mesh=device_mesh, ignored_params=scalars or None)


def average_replicated_grads(model: torch.nn.Module, device_mesh) -> None:
    """Give every plain (not DTensor) parameter of a model sharded by :func:`fsdp2_by_layer`
    a hook that averages its gradient over ``device_mesh`` after each backward, as FSDP2 does
    for the parameters it shards: without it, ranks that trained on different data would hold
    different values after the first optimizer step. Call it after loading (the load replaces
    parameters that were on meta, and their hooks with them)."""
    from torch.distributed.tensor import DTensor

    plain = [p for p in model.parameters() if not isinstance(p, DTensor) and p.requires_grad]
    if not plain or device_mesh is None:
        return
    group = device_mesh.get_group() if device_mesh.ndim == 1 else device_mesh._flatten().get_group()
    size = dist.get_world_size(group)

    def average(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(size)

    for p in plain:
        p.register_post_accumulate_grad_hook(average)


def from_pretrained(
    model_class,
    checkpoint: str | os.PathLike,
    *,
    device_mesh=None,
    shard: ShardFn | None = None,
    dtype: torch.dtype | str | None = None,
    group: dist.ProcessGroup | None = None,
    config=None,
    return_report: bool = False,
    **load_kwargs: Any,
) -> torch.nn.Module | tuple[torch.nn.Module, LoadReport]:
    """Build ``model_class`` from the config in ``checkpoint`` and load its weights with
    :func:`distshard.load`; return the model in eval mode (and the :class:`LoadReport` as
    ``(model, report)`` when ``return_report=True``).

    - ``model_class``: an Auto class (``AutoModelForCausalLM``; built with ``from_config``) or a
      concrete one (``LlamaForCausalLM``, ``BertModel``).
    - ``checkpoint``: a local folder with ``config.json`` and the weights (or the path of a
      weights file in that folder). Nothing is downloaded: the config is read with
      ``local_files_only=True``.
    - ``dtype``: as transformers' default ``dtype="auto"``: the config's ``dtype`` when it has
      one, else that of the checkpoint's first floating tensor; a ``torch.dtype`` or its name
      overrides it. The model is built in that dtype, so modules that transformers keeps in
      float32 (``_keep_in_fp32_modules``) stay in float32 here too.
    - ``shard(model, device_mesh)``: called on the tied meta model before loading (for example
      ``fully_shard`` per layer and on the root, or ``parallelize_module``). With
      ``device_mesh`` and no ``shard``, :func:`fsdp2_by_layer` is used.
    - ``group`` and ``load_kwargs`` (``device``, ``strict``, ``key_mapping``, ``bucket_size``,
      ``timeout``, ...) go to :func:`distshard.load`. As transformers' ``from_pretrained``,
      the default is ``strict=False``: model tensors the checkpoint lacks (a new head) are
      initialised and listed (``report.initialized_keys``, a warning on rank 0), checkpoint
      tensors the model does not use are listed and not read.
    """
    load_kwargs.setdefault("strict", False)
    if device_mesh is not None and shard is None:
        shard = fsdp2_by_layer
    comm = Comm(group, _timeout(load_kwargs.get("timeout", DEFAULT_TIMEOUT)))
    model, failure = None, None
    try:
        model = build_meta_model(model_class, checkpoint, dtype, config)
    except Exception as e:
        failure = failure_of(e, comm.rank, "build")
    comm.agree(failure, [])
    if shard is not None:
        # After the first agreement: a callback that runs collectives (device meshes, tensor
        # parallel plans) must not be entered by some ranks while others have failed.
        try:
            shard(model, device_mesh)
        except Exception as e:
            failure = failure_of(e, comm.rank, "shard")
        comm.agree(failure, [])
    report = load(model, checkpoint, group=group, **load_kwargs)
    if shard is fsdp2_by_layer:
        average_replicated_grads(model, device_mesh)
    model.eval()
    return (model, report) if return_report else model


def _timeout(value) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=float(value))


def _config_folder(checkpoint: str | os.PathLike) -> str:
    """The folder holding ``config.json``: ``checkpoint`` itself, or the folder of a weights
    file. Raises :class:`DistShardError` naming the path when there is no local config."""
    path = os.fspath(checkpoint)
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    config_file = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.exists(path):
        raise DistShardError(
            f"distshard.from_pretrained: {path!r} is not a local folder or file; distshard never "
            "downloads: fetch the repository first (huggingface_hub.snapshot_download) and pass "
            "its folder", file=path)
    if not os.path.isfile(config_file):
        raise DistShardError(
            f"distshard.from_pretrained: no config.json in {folder!r}; the model is built from "
            "it. Write it with config.save_pretrained(folder), or build the model yourself and "
            "call distshard.load(model, checkpoint)", file=config_file)
    return folder


def build_meta_model(model_class, checkpoint, dtype=None, config=None) -> torch.nn.Module:
    """The model of ``checkpoint``'s config in the resolved dtype: parameters on meta, buffers
    real, weights tied."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    folder = _config_folder(checkpoint)
    if config is None:
        config_class = _config_class(model_class)
        config = config_class.from_pretrained(folder, local_files_only=True)
    dtype = _resolve_dtype(dtype, config, checkpoint)
    # Parameters on meta, buffers (rotary inv_freq) real; and, as transformers' own loader
    # does, no initialisation of weights that the load replaces: the init functions run on each
    # meta parameter cost ~0.9 s for a 147-tensor Llama (13 ms without them).
    with init_empty_weights(), no_init_weights():
        if hasattr(model_class, "_from_config"):
            model = model_class._from_config(config, dtype=dtype)
        else:
            model = model_class.from_config(config, dtype=dtype)
    _keep_in_fp32(model, dtype)
    model.tie_weights()  # before any sharding, so that FSDP and TP see the tied weights
    _attach_generation_config(model, folder)
    logger.debug("distshard.from_pretrained: built %s in %s on meta", type(model).__name__, dtype)
    return model


def _config_class(model_class):
    from transformers import AutoConfig, PretrainedConfig

    own = getattr(model_class, "config_class", None)
    if isinstance(own, type) and issubclass(own, PretrainedConfig) and own is not PretrainedConfig:
        return own
    return AutoConfig


def _resolve_dtype(dtype, config, checkpoint) -> torch.dtype:
    """transformers' ``dtype="auto"``: explicit, else the config's, else the checkpoint's."""
    if dtype is None or dtype == "auto":
        # transformers < 4.56 names it torch_dtype; newer ones warn when that name is read
        dtype = getattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", None)
        if dtype is None:
            dtype = _checkpoint_dtype(checkpoint)
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not the name of a torch.dtype")
        dtype = value
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, its name, 'auto' or None; got {dtype!r}")
    return dtype


def _checkpoint_dtype(checkpoint) -> torch.dtype | str:
    """As transformers reads a checkpoint's dtype: the index's ``metadata.dtype`` where there is
    one; else, in the first file (names sorted for safetensors, as ``safe_open`` lists them; in
    pickle order for ``.bin``), the first floating tensor's dtype that is not float8 or float4,
    or the first tensor's; float32 for an empty file. Headers only."""
    ckpt = find_checkpoint(checkpoint)
    if ckpt.metadata and isinstance(ckpt.metadata.get("dtype"), str):
        return ckpt.metadata["dtype"]
    tensors = describe_file(ckpt.root, ckpt.files[0], ckpt.kind).tensors
    infos = [tensors[k] for k in sorted(tensors)] if ckpt.kind == "safetensors" else list(
        tensors.values())
    return next((t.dtype for t in infos if t.dtype.is_floating_point and not is_float8(t.dtype)),
                infos[0].dtype if infos else torch.float32)


def _keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Modules transformers keeps in float32 at this dtype (``_keep_in_fp32_modules``) go back
    to float32 while still on meta, so that the load converts their data to float32."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    pattern = re.compile("|".join(f"(?:{p})" for p in plan))
    for name, module in model.named_modules():
        if name and pattern.search(name):
            module.to(torch.float32)


def _attach_generation_config(model: torch.nn.Module, folder: str) -> None:
    """As transformers does: a model that generates takes ``generation_config.json``."""
    path = os.path.join(folder, "generation_config.json")
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate() and os.path.isfile(path)):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
