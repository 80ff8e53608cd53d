"""Load a sharded checkpoint across 4 ranks with distshard and print the report.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 launch_examples/demo.py [--checkpoint DIR] [--size tiny|small|large]

Without --checkpoint, rank 0 first writes a sample Llama-like checkpoint (random weights).
Every rank builds the model on the meta device, reads only its share of the files, and receives
the rest by broadcast; the checksum line shows that every rank ended with the same weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import meta_model, start

import distshard
from distshard.testing import end_job


def main() -> None:
    _, ckpt = start(__doc__.splitlines()[0], default_size="small")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = meta_model(ckpt)
    report = distshard.load(model, ckpt, log_summary=False)

    with torch.no_grad():
        checksum = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.empty_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        print(f"checkpoint: {ckpt}")
        print(f"{'rank':>4}  {'bytes read':>12}  {'peak host memory':>16}")
        for r in range(world):
            print(f"{r:>4}  {report.bytes_read_per_rank[r]:>12,}  "
                  f"{report.peak_host_memory_per_rank[r]:>16,}")
        print(report.summary())
        same = all(torch.equal(s, sums[0]) for s in sums)
        print(f"parameter checksum {float(sums[0]):.6f} on every rank: {'same' if same else 'DIFFERENT'}")
    end_job()  # barrier, destroy the process group, exit (see its docstring)


if __name__ == "__main__":
    main()
