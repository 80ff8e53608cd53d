"""A mixture-of-experts checkpoint (one tensor per expert, as ``save_pretrained`` writes it) into
the model's fused expert tensors, under FSDP2: each rank reads only its own experts' tensors.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 launch_examples/moe.py [--checkpoint DIR]

``from_pretrained`` builds the model on meta, shards it per layer (``fully_shard``), and loads
it: transformers' own conversion rules say that ``...experts.3.w1.weight`` is box 3 of the fused
``...mlp.experts.gate_up_proj``, so the rank that holds experts 2-3 reads those experts' bytes,
straight into its shard, and no other rank reads them.
"""

from __future__ import annotations

import torch.distributed as dist
from common import start, train_step
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

import distshard
from distshard.testing import end_job


def main() -> None:
    device, ckpt = start(__doc__.splitlines()[0], default_size="moe-tiny")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model, report = distshard.from_pretrained(AutoModelForCausalLM, ckpt, device_mesh=mesh,
                                              device=device, return_report=True)
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    loss = train_step(model.train(), model.config.vocab_size, device)
    line = (f"rank {dist.get_rank()}: experts {fused.to_local().shape[0]} of {fused.shape[0]} "
            f"in {type(fused).__name__} {tuple(fused.shape)}; read {report.bytes_read:,} of "
            f"{report.total_bytes_read:,} bytes; received {report.bytes_received} bytes\n")
    for rank in range(dist.get_world_size()):  # in rank order
        if rank == dist.get_rank():
            print(line, end="", flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        print(report.summary())
        print(f"one FSDP2 step done, loss {loss:.4f}")
    end_job()  # barrier, destroy the process group, exit (see its docstring)


if __name__ == "__main__":
    main()
