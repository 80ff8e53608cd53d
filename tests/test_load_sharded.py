"""DTensor parameters: FSDP2, tensor parallel and a 2-D (dp, tp) mesh, on gloo ranks.

Every rank must hold exactly its slice of the single-process reference, ``full_tensor()`` must
give the reference, and a forward pass the reference output.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from checkpoints import CASES, empty_model, reference, sample_input
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import distshard
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess
DEADLINE = 400
SMALL_BUCKET = 8192

LLAMA_TP = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}


def blocks(model) -> list[torch.nn.Module]:
    for path in ("model.layers", "transformer.h", "encoder.layer"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"no blocks in {type(model).__name__}")


def shard_fsdp(model, mesh) -> None:
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_tp(model, mesh) -> None:
    for block in blocks(model):
        parallelize_module(block, mesh, LLAMA_TP)


def output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(sample_input())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def check_sharded(model, ref, where: str, *, exact_output: bool) -> int:
    """Return how many DTensor parameters were checked."""
    want = dict(ref.named_parameters(remove_duplicate=False))
    sharded = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p.device.type != "meta", f"{where}: {name} left on meta"
        if isinstance(p, DTensor):
            sharded += 1
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            box = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            assert torch.equal(p.to_local(), want[name][box]), f"{where}: local shard of {name}"
            assert torch.equal(p.full_tensor(), want[name]), f"{where}: full_tensor of {name}"
        else:
            assert torch.equal(p, want[name]), f"{where}: {name}"
    for name, b in ref.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], b), f"{where}: buffer {name}"
    got, expected = output(model), output(ref)
    if exact_output:
        assert torch.equal(got, expected), f"{where}: outputs differ"
    else:  # tensor parallel reduces partial sums in another order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{where}: outputs")
    return sharded


def _fsdp2(rank: int, world_size: int, paths: dict[str, str]) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name, own in [(n, own) for n in ("llama", "gpt2", "bert") for own in (True, False)]:
        model = empty_model(CASES[name][0])
        model.tie_weights()  # ties must exist before sharding for FSDP to see them
        shard_fsdp(model, mesh)
        report = distshard.load(model, paths[name], bucket_size=SMALL_BUCKET, read_own_slices=own)
        if name == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.weight, "tie lost"
        local = sum(p.to_local().nbytes for p in model.parameters())
        n = check_sharded(model, reference(name, paths[name]), f"{name} rank {rank}",
                          exact_output=True)
        out[name, own] = (n, report.bytes_read, report.total_bytes_read, report.bytes_received, local)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_ranks_receive_exactly_their_shards(checkpoints, world_size):
    results = run_ranks(_fsdp2, world_size, checkpoints, timeout=DEADLINE)
    for case in results[0]:
        assert results[0][case][0] > 0, f"{case}: no DTensor parameters were checked"
        assert sum(r[case][1] for r in results) == results[0][case][2]  # each byte read once
        for n, read, total, received, local in (r[case] for r in results):
            if case[1]:  # each rank read exactly its own shards; nothing crossed the network
                assert (read, received) == (local, 0), case
            else:  # sent by the reader: a rank receives at most its own shards
                assert 0 < received <= local < total, case


def _fsdp2_in_float64(rank: int, world_size: int, path: str) -> tuple[int, set]:
    mesh = init_device_mesh("cpu", (world_size,))
    model = empty_model("llama")
    shard_fsdp(model, mesh)
    distshard.load(model, path, bucket_size=SMALL_BUCKET, dtype=torch.float64)
    want = dict(reference("llama", path).named_parameters(remove_duplicate=False))
    sharded = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)
               if isinstance(p, DTensor)]
    for name, p in sharded:
        assert p.dtype == p.to_local().dtype == torch.float64, name
        assert torch.equal(p.full_tensor(), want[name].double()), name
    return len(sharded), {p._spec.tensor_meta.dtype for _, p in sharded}


def test_fsdp2_loads_in_the_dtype_asked_for(checkpoints):
    """The loaded DTensors are of that dtype through and through (their spec too)."""
    for n, dtypes in run_ranks(_fsdp2_in_float64, 2, checkpoints["llama"], timeout=DEADLINE):
        assert n > 0 and dtypes == {torch.float64}


def _fsdp2_parameters(rank: int, world_size: int, path: str) -> list[str]:
    mesh = init_device_mesh("cpu", (world_size,))
    model = empty_model("llama").train()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    shard_fsdp(model, mesh)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    distshard.load(model, path, bucket_size=SMALL_BUCKET)
    bad = []
    for name, p in model.named_parameters():
        if not (isinstance(p, DTensor) and isinstance(p, torch.nn.Parameter) and p.is_leaf
                and p.requires_grad == trainable[name]):
            bad.append(f"{name}: {type(p).__name__}, leaf {p.is_leaf}, grad {p.requires_grad}")
        # what torch's own Parameter makes of the same DTensor
        theirs = torch.nn.Parameter(DTensor(p._local_tensor, p._spec, requires_grad=False),
                                    requires_grad=trainable[name])
        if vars(p) != vars(theirs):
            bad.append(f"{name}: {vars(p)} != {vars(theirs)}")
    model(sample_input()).logits.sum().backward()  # FSDP2 trains what was loaded
    for name, p in model.named_parameters():
        if (p.grad is None) == trainable[name]:
            bad.append(f"{name}: grad {None if p.grad is None else 'set'}")
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for name, p in model.named_parameters():
        if torch.equal(p.full_tensor(), before[name]) == trainable[name]:
            bad.append(f"{name}: {'unchanged' if trainable[name] else 'changed'} by a step")
    return bad


def test_fsdp2_parameters_are_torch_parameters_that_train(checkpoints):
    """The DTensor parameters a load makes are what ``torch.nn.Parameter`` makes (leaves, as
    trainable as before, marked alike), FSDP2 computes their gradients, and a step moves them."""
    assert run_ranks(_fsdp2_parameters, 2, checkpoints["llama"], timeout=DEADLINE) == [[], []]


def _tensor_parallel(rank: int, world_size: int, path: str) -> int:
    mesh = init_device_mesh("cpu", (world_size,))
    model = empty_model("llama")
    shard_tp(model, mesh)  # embeddings and norms stay plain: a mixed model
    distshard.load(model, path, bucket_size=SMALL_BUCKET)
    return check_sharded(model, reference("llama", path), f"tp rank {rank}", exact_output=False)


def test_tensor_parallel_llama_on_two_ranks(checkpoints):
    assert all(n == 14 for n in run_ranks(_tensor_parallel, 2, checkpoints["llama"], timeout=DEADLINE))


def _fsdp_tp(rank: int, world_size: int, path: str) -> int:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = empty_model("llama")
    shard_tp(model, mesh["tp"])
    shard_fsdp(model, mesh["dp"])
    distshard.load(model, path, bucket_size=SMALL_BUCKET)
    return check_sharded(model, reference("llama", path), f"2-D rank {rank}", exact_output=False)


def test_fsdp_by_tp_on_a_two_by_two_mesh(checkpoints):
    assert all(n > 14 for n in run_ranks(_fsdp_tp, 4, checkpoints["llama"], timeout=DEADLINE))


def _refused_placements(rank: int, world_size: int, root: str) -> dict:
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    ckpt = os.path.join(root, "ckpt")
    if rank == 0:
        save_file({"weight": full}, os.path.join(ckpt, "model.safetensors"))
    dist.barrier()
    out = {}
    placements = {"strided": [_StridedShard(0, split_factor=2)], "partial": [Partial()]}
    for name, placement in placements.items():
        for action in ("load", "save"):
            local = full.chunk(world_size)[rank] if name == "strided" else full / world_size
            weight = DTensor.from_local(local, mesh, placement, run_check=False,
                                        shape=full.shape, stride=full.stride())
            model = torch.nn.Linear(3, 8, bias=False, device="meta")
            model.weight = torch.nn.Parameter(weight.to("meta") if action == "load" else weight)
            try:
                if action == "load":
                    distshard.load(model, ckpt, log_summary=False)
                else:
                    distshard.save(model, os.path.join(root, f"{name}-saved"))
                out[name, action] = None
            except distshard.DistShardError as e:
                out[name, action] = (str(e), e.key, model.weight.is_meta)
            dist.barrier()
    return out


@pytest.mark.multiprocess
def test_placements_without_a_box_per_rank_are_refused_not_garbled(tmp_path):
    # A 1-D _StridedShard interleaves rows (no box describes a rank's part) and a Partial
    # placement holds parts of a sum: loading or saving either used to give wrong values.
    os.makedirs(tmp_path / "ckpt")
    results = run_ranks(_refused_placements, 2, str(tmp_path), timeout=DEADLINE)
    for r in results:
        for (name, action), outcome in r.items():
            assert outcome is not None, f"{name} {action} was not refused"
            message, key, meta = outcome
            assert key == "weight" and "Replicate" in message, (name, action, message)
            assert action == "save" or meta, f"{name}: the failed load changed the model"
    assert not any((tmp_path / f"{n}-saved" / "model.safetensors").exists()
                   for n in ("strided", "partial"))
