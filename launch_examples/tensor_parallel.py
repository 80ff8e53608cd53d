"""Tensor-parallel load (``parallelize_module``): each rank receives its column or row slice.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch_examples/tensor_parallel.py [--checkpoint DIR]

Attention and MLP projections are split over the ranks (colwise in, rowwise out); embeddings and
norms stay plain tensors, which distshard broadcasts whole. The output is the same on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import meta_model, start
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import distshard
from distshard.testing import end_job

PLAN = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel()}


def main() -> None:
    device, ckpt = start(__doc__.splitlines()[0])
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model = meta_model(ckpt)
    for layer in model.model.layers:
        parallelize_module(layer, mesh, PLAN)
    report = distshard.load(model, ckpt, device=device)
    model.eval()
    with torch.no_grad():
        logits = model(torch.arange(8, device=device).reshape(1, 8)).logits
    sums = [torch.empty(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, logits.double().sum().reshape(1))
    if dist.get_rank() == 0:
        print(report.summary())
        print(f"logits checksum {float(sums[0]):.6f} on every rank: "
              f"{'same' if all(torch.equal(s, sums[0]) for s in sums) else 'DIFFERENT'}")
    end_job()  # barrier, destroy the process group, exit (see its docstring)


if __name__ == "__main__":
    main()
