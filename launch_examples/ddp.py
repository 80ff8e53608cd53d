"""Replicated load for DistributedDataParallel, then one training step.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch_examples/ddp.py [--checkpoint DIR]

distshard.load leaves identical weights on every rank, so DDP's own start-up broadcast of the
parameters would send them all again: ``init_sync=False`` skips it.
"""

from __future__ import annotations

import torch.distributed as dist
from common import meta_model, start, train_step
from torch.nn.parallel import DistributedDataParallel

import distshard
from distshard.testing import end_job


def main() -> None:
    device, ckpt = start(__doc__.splitlines()[0])
    model = meta_model(ckpt)  # parameters on meta: nothing random is initialised
    report = distshard.load(model, ckpt, device=device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  init_sync=False)
    loss = train_step(ddp, model.config.vocab_size, device)
    if dist.get_rank() == 0:
        print(report.summary())
        print(f"one DDP step done, loss {loss:.4f}")
    end_job()  # barrier, destroy the process group, exit (see its docstring)


if __name__ == "__main__":
    main()
