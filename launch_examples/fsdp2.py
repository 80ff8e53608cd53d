"""Sharded load for FSDP2 (``fully_shard``): each rank receives only its own shard.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch_examples/fsdp2.py [--checkpoint DIR]

Shard the meta model first, then load: the parameters are DTensors on meta, and distshard fills
each rank's local shard. No rank ever holds the full model.
"""

from __future__ import annotations

import torch.distributed as dist
from common import meta_model, start, train_step
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distshard
from distshard.testing import end_job


def main() -> None:
    device, ckpt = start(__doc__.splitlines()[0])
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model = meta_model(ckpt)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = distshard.load(model, ckpt, device=device)
    loss = train_step(model, model.config.vocab_size, device)
    if dist.get_rank() == 0:
        print(report.summary())
        print(f"rank 0 holds {sum(p.to_local().numel() for p in model.parameters()):,} of "
              f"{sum(p.numel() for p in model.parameters()):,} parameters; "
              f"received {report.bytes_received:,} bytes")
        print(f"one FSDP2 step done, loss {loss:.4f}")
    end_job()  # barrier, destroy the process group, exit (see its docstring)


if __name__ == "__main__":
    main()
