"""Loads onto a GPU: gloo ranks loading into CUDA parameters (host staging, copies to the
device) and nccl ranks (buckets on the GPU, the read-ahead into pinned host memory, narrowing by
the reader, FSDP2 slices). Each GPU case is skipped with its reason where there is no GPU; its
CPU twin runs the same body everywhere, so the checks the GPU runs make are themselves tested on
every machine.

One GPU hosts one nccl rank only (nccl refuses two ranks on one device): nccl on two ranks needs
two GPUs.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import CASES, empty_model, reference

import distshard
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess
DEADLINE = 300
SMALL_BUCKET = 8192  # many buckets: several tensors in one, tensors larger than one
GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs a CUDA GPU; the CPU twin of this case runs here")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="nccl on two ranks needs two GPUs; the CPU twin runs here")
MODES = {  # how the bytes move, as load's options choose it
    "default": {},
    "backend broadcast, read ahead": dict(shared_memory=False, read_own_slices=False),
}


def _load_on(rank: int, world_size: int, paths: dict[str, str], device_type: str) -> list[str]:
    """Every case, mode and dtype loaded onto ``device_type``: each parameter and persistent
    buffer on the device and, back on the CPU, bitwise what one process gets (converted once, on
    the CPU, where a dtype is asked for). Returns what was checked."""
    from test_load_sharded import shard_fsdp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    if device_type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    checked = []
    for name, path in paths.items():
        ref = reference(name, path)
        for dtype in (None, torch.bfloat16):
            want = (ref if dtype is None else ref.to(dtype)).state_dict()
            for mode, options in [*MODES.items(), ("fsdp2", {})]:
                model = empty_model(CASES[name][0])
                if mode == "fsdp2":
                    model.tie_weights()
                    shard_fsdp(model, init_device_mesh(device_type, (world_size,)))
                distshard.load(model, path, device=device, dtype=dtype,
                               bucket_size=SMALL_BUCKET, log_summary=False, **options)
                got = model.state_dict()
                assert sorted(got) == sorted(want), f"{name} {mode}: names differ"
                for key, value in got.items():
                    local = value.to_local() if isinstance(value, DTensor) else value
                    assert local.device == device, f"{name} {mode} {dtype}: {key} on {local.device}"
                    full = value.full_tensor() if isinstance(value, DTensor) else value
                    full = full.cpu()
                    assert full.dtype == want[key].dtype, f"{name} {mode} {dtype}: {key} dtype"
                    assert torch.equal(full, want[key]), f"{name} {mode} {dtype}: {key} differs"
                for key, buffer in model.named_buffers():  # those not in the checkpoint too
                    assert buffer.device == device, f"{name} {mode}: {key} on {buffer.device}"
                checked.append(f"{name}/{mode}/{dtype}")
    return checked


@pytest.mark.parametrize("backend, device_type, world_size", [
    pytest.param("gloo", "cpu", 2, id="gloo-cpu-2 (CPU twin)"),
    pytest.param("gloo", "cuda", 2, id="gloo-cuda-2", marks=GPU),
    pytest.param("nccl", "cuda", 1, id="nccl-cuda-1", marks=GPU),
    pytest.param("nccl", "cuda", 2, id="nccl-cuda-2", marks=TWO_GPUS),
])
def test_loads_onto_the_device_bitwise(checkpoints, backend, device_type, world_size):
    paths = {name: checkpoints[name] for name in ("llama", "llama-bin")}
    results = run_ranks(_load_on, world_size, paths, device_type, backend=backend,
                        timeout=DEADLINE)
    assert len(results) == world_size
    assert all(len(r) == 2 * 2 * 3 for r in results), results  # cases x dtypes x modes
