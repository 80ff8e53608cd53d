"""The zoo (``tests/zoo.py``): every architecture loaded by ``distshard.from_pretrained`` on 2 gloo
ranks, replicated and under FSDP2, bitwise equal on every rank to transformers' own
``from_pretrained`` -- every parameter and buffer, ties as transformers has them. Then the
fine-tuning layouts (a base model's checkpoint into a model with a new head, and a model with a
head into its base model), tied weights that the user sharded without tying, and new weights
equal on every rank. One spawn for all of it; every case runs, and the test lists each one that
failed."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist
from zoo import ZOO, auto_class, transpose_experts, write_zoo

import distshard
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess
DEADLINE = 420

# checkpoint written by save_pretrained of one class, loaded into another (transformers adds or
# strips the base-model prefix; the head is new)
FINETUNE = {
    "llama-base->causal-lm": ("llama", "LlamaModel", "AutoModelForCausalLM"),
    "llama-base->seq-cls": ("llama", "LlamaModel", "AutoModelForSequenceClassification"),
    "bert-mlm->base": ("bert", "BertForMaskedLM", "AutoModel"),
    "bert-mlm->seq-cls": ("bert", "BertForMaskedLM", "AutoModelForSequenceClassification"),
}
# tied weights the user shards without tying first: the tied key is not in the checkpoint
UNTIED = {"gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration",
          "bert-mlm": "BertForMaskedLM"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    import transformers
    from transformers import AutoConfig

    root = str(tmp_path_factory.mktemp("zoo"))
    out = write_zoo(root)
    out["qwen3_vl_moe-hub"] = transpose_experts(out["qwen3_vl_moe"],
                                                os.path.join(root, "qwen3_vl_moe-hub"))
    for case, (arch, cls, _) in FINETUNE.items():
        config = AutoConfig.for_model(ZOO[arch][0], **ZOO[arch][2])
        path = os.path.join(root, cls)
        if not os.path.exists(path):
            torch.manual_seed(1)
            getattr(transformers, cls)(config).save_pretrained(path, max_shard_size="40KB")
        out[case] = path
    out["bert-mlm"] = out["bert-mlm->base"]
    return out


def _differences(model, ref) -> list[str]:
    """Keys whose names, dtypes or values differ from transformers' (DTensors gathered, in
    sorted order on every rank: full_tensor is a collective)."""
    from torch.distributed.tensor import DTensor

    got = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    want = dict(ref.named_parameters(remove_duplicate=False)) | dict(ref.named_buffers())
    bad = [f"{k}: absent" for k in sorted(set(want) - set(got))]
    bad += [f"{k}: not in transformers' model" for k in sorted(set(got) - set(want))]
    for key in sorted(set(got) & set(want)):
        value = got[key]
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if value.dtype != want[key].dtype or not torch.equal(value, want[key]):
            bad.append(f"{key}: differs")
    return bad


def _ties(model, ref) -> list[str]:
    """Tied parameters of transformers' model are one object here too."""
    ids = {}
    for name, p in ref.named_parameters(remove_duplicate=False):
        ids.setdefault(id(p), []).append(name)
    mine = dict(model.named_parameters(remove_duplicate=False))
    return [f"{names} not tied" for names in ids.values() if len(names) > 1
            and len({id(mine[n]) for n in names if n in mine}) != 1]


def _same_on_every_rank(model, keys) -> list[str]:
    """``keys`` hold the same values on every rank (DTensors: gathered)."""
    from torch.distributed.tensor import DTensor

    bad = []
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for key in sorted(keys):
        value = state[key]
        value = value.full_tensor() if isinstance(value, DTensor) else value
        rows = [torch.empty_like(value) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, value.contiguous())
        if not all(torch.equal(r, rows[0]) for r in rows):
            bad.append(f"{key}: differs between ranks")
    return bad


def _zoo_case(name: str, path: str, mesh) -> list[str]:
    cls = auto_class(name.removesuffix("-hub"))
    ref = cls.from_pretrained(path)
    model, report = distshard.from_pretrained(cls, path, device_mesh=mesh, return_report=True,
                                              timeout=60)
    bad = _differences(model, ref) + _ties(model, ref)
    if report.initialized_keys or report.unexpected_keys:
        bad.append(f"new {report.initialized_keys}, unused {report.unexpected_keys}")
    if name.endswith("-hub") and not report.converted_keys:
        bad.append("the transposed experts did not take the conversion route")
    return bad


def _finetune_case(case: str, path: str, mesh) -> list[str]:
    """Bitwise equal to transformers except the new weights, which transformers initialises at
    random: the same keys are new, they are initialised, and equal on every rank."""
    cls = getattr(__import__("transformers"), FINETUNE[case][2])
    ref, info = cls.from_pretrained(path, output_loading_info=True)
    model, report = distshard.from_pretrained(cls, path, device_mesh=mesh, return_report=True,
                                              timeout=60)
    new = set(report.initialized_keys)
    bad = [] if new == set(info["missing_keys"]) and new else [
        f"initialized {sorted(new)}, transformers: {sorted(info['missing_keys'])}"]
    if sorted(report.unexpected_keys) != sorted(info["unexpected_keys"]):
        bad.append(f"unexpected {report.unexpected_keys}, transformers: {info['unexpected_keys']}")
    for key in new:  # so that they compare equal below: their values are checked apart
        ref.get_parameter(key).data.zero_()
    got = dict(model.named_parameters())
    bad += [d for d in _differences(model, ref) if d.split(":")[0] not in new]
    bad += _same_on_every_rank(model, new)
    for key in sorted(new):  # the same order on every rank: full_tensor is a collective
        value = got[key].full_tensor() if hasattr(got[key], "full_tensor") else got[key]
        if key.endswith("weight") and not (0 < value.float().std() < 1):
            bad.append(f"{key}: std {value.float().std():.3f}, not the model's initialisation")
    return bad


def _untied_case(name: str, path: str, mesh) -> list[str]:
    """The user builds the meta model and shards it without tying: the tied key, absent from
    the checkpoint, is read from the tensor it is tied to."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig

    cls = getattr(__import__("transformers"), UNTIED[name])
    with init_empty_weights():
        model = cls(AutoConfig.from_pretrained(path))
    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or ()):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = distshard.load(model, path, timeout=60)
    return _differences(model, cls.from_pretrained(path)) + (
        [f"missing {report.missing_keys}"] if report.missing_keys else [])


def _read_once_case(name: str, path: str, mesh) -> list[str]:
    """Fused experts are planned as byte ranges: replicated, the job reads every checkpoint
    byte once; under FSDP2 each rank reads exactly the bytes of its own shards -- its own
    experts' tensors -- straight into them (nothing is sent)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    total = 0
    for file in (f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), "pt") as f:
            total += sum(torch.Size(f.get_slice(k).get_shape()).numel() * 4 for k in f.keys())
    cls = auto_class(name)
    model, report = distshard.from_pretrained(cls, path, device_mesh=mesh, return_report=True)
    if mesh is None:
        return [] if report.total_bytes_read == total else [
            f"the job read {report.total_bytes_read} bytes of a {total}-byte checkpoint"]
    own = sum(p.to_local().numel() * 4 for p in model.parameters() if isinstance(p, DTensor))
    bad = [] if report.bytes_read == own else [f"read {report.bytes_read}, its shards hold {own}"]
    return bad + ([f"received {report.bytes_received}"] if report.bytes_received else [])


def _nodes_case(name: str, path: str, how: str) -> list[str]:
    """Each rank its own simulated node: fused experts (boxes, not one run of the node image)
    cross nodes as read; with ``locality="node"`` each node reads the whole checkpoint, also
    under FSDP2; narrowed to bfloat16 on the way."""
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["DISTSHARD_NODE"] = str(dist.get_rank())
    try:
        cls = auto_class(name)
        dtype = torch.bfloat16 if how == "bf16" else None
        mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if how == "node-fsdp2" else None
        model, report = distshard.from_pretrained(
            cls, path, device_mesh=mesh, dtype=dtype, return_report=True,
            locality="node" if how.startswith("node") else "cluster")
        bad = _differences(model, cls.from_pretrained(path, dtype=dtype or "auto"))
        if how != "node-fsdp2" and report.shared_copy != "shm":
            bad.append(f"shared through {report.shared_copy}, not the node image")
        return bad
    finally:
        del os.environ["DISTSHARD_NODE"]


def _scalar_grad_case(name: str, path: str, mesh) -> list[str]:
    """CLIP under from_pretrained's FSDP2: the scalar ``logit_scale``, which ``fully_shard``
    refuses, stays replicated, and its gradient is the mean over the ranks (as FSDP2 gives the
    sharded ones), so the ranks stay in step through training."""
    cls = auto_class(name)
    model = distshard.from_pretrained(cls, path, device_mesh=mesh).train()
    ref = cls.from_pretrained(path).train()
    generator = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data
    batch = dict(input_ids=torch.randint(0, 96, (2, 8), generator=generator),
                 pixel_values=torch.randn(2, 3, 16, 16, generator=generator), return_loss=True)
    model(**batch).loss.backward()
    ref(**batch).loss.backward()
    mine, theirs = model.logit_scale.grad, ref.logit_scale.grad.clone()
    dist.all_reduce(theirs)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    bad = [] if all(torch.equal(r, rows[0]) for r in rows) else [f"grads differ: {rows}"]
    if not torch.allclose(mine, theirs / dist.get_world_size(), rtol=1e-4, atol=1e-6):
        bad.append(f"grad {mine}, the mean of the ranks' grads {theirs / dist.get_world_size()}")
    return bad


def _every_case(rank: int, world_size: int, paths: dict[str, str]) -> dict[str, list[str]]:
    from torch.distributed.device_mesh import init_device_mesh

    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("distshard").setLevel(logging.ERROR)
    mesh = init_device_mesh("cpu", (world_size,))
    cases = [(f"{mode} {name}", _zoo_case, name, m) for mode, m in (("replicated", None),
                                                                     ("fsdp2", mesh))
             for name in [*ZOO, "qwen3_vl_moe-hub"]]
    cases += [(f"{mode} {case}", _finetune_case, case, m) for mode, m in (("replicated", None),
                                                                          ("fsdp2", mesh))
              for case in FINETUNE]
    cases += [(f"untied {name}", _untied_case, name, mesh) for name in UNTIED]
    cases += [(f"read once {mode} {name}", _read_once_case, name, m)
              for mode, m in (("replicated", None), ("fsdp2", mesh))
              for name in ("mixtral", "qwen3_moe")]
    cases += [(f"nodes {how} mixtral", _nodes_case, "mixtral", how)
              for how in ("cluster", "bf16", "node", "node-fsdp2")]
    cases += [("fsdp2 scalar grads clip", _scalar_grad_case, "clip", mesh)]
    out = {}
    for label, run, name, m in cases:
        try:
            out[label] = run(name, paths[name], m)
        except Exception as e:  # the same on every rank: distshard's errors are agreed
            out[label] = [f"{type(e).__name__}: {e}"]
        dist.barrier()
    return out


def test_the_zoo_loads_as_transformers_loads_it(paths):
    assert len(ZOO) >= 30
    results = run_ranks(_every_case, 2, paths, timeout=DEADLINE)
    failed = {f"rank {rank} {label}": bad for rank, result in enumerate(results)
              for label, bad in result.items() if bad}
    assert not failed, "\n".join(f"{label}: {bad}" for label, bad in failed.items())
    assert len(results[0]) == 2 * (len(ZOO) + 1) + 2 * len(FINETUNE) + len(UNTIED) + 4 + 4 + 1
