"""FullyShardedDataParallel (FSDP1): load replicated, then wrap.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch_examples/fsdp1.py [--checkpoint DIR]

FSDP1 flattens a module's parameters when it wraps it, so it needs real values there: load the
meta model with distshard first (each file read once per job, every rank ends with the full
model), then wrap; FSDP1 keeps each rank's shard and frees the rest. Every rank holds the whole
model for a moment, so for models near the host-memory limit prefer FSDP2 (launch_examples/fsdp2.py),
where distshard sends each rank only its shard. ``sync_module_states`` stays off: the ranks are
already equal.
"""

from __future__ import annotations

import torch.distributed as dist
from common import meta_model, start, train_step
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import distshard
from distshard.testing import end_job


def main() -> None:
    device, ckpt = start(__doc__.splitlines()[0])
    model = meta_model(ckpt)
    report = distshard.load(model, ckpt, device=device)
    block = type(model.model.layers[0])
    fsdp = FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy({block}),
        device_id=device, use_orig_params=True, sync_module_states=False)
    loss = train_step(fsdp, model.config.vocab_size, device)
    if dist.get_rank() == 0:
        print(report.summary())
        print(f"one FSDP1 step done, loss {loss:.4f}")
    end_job()  # barrier, destroy the process group, exit (see its docstring)


if __name__ == "__main__":
    main()
