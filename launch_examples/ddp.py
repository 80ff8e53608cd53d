"""Replicated load for DistributedDataParallel, then one training step.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch_examples/ddp.py [--checkpoint DIR]

distshard.load leaves identical weights on every rank, so DDP's own start-up broadcast of the
parameters is redundant: ``init_sync=False`` skips it.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from sample_checkpoint import ensure_checkpoint
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoModelForCausalLM

import distshard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder or file (default: a sample)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ckpt = ensure_checkpoint(args.checkpoint, "tiny")

    with init_empty_weights():  # parameters on meta: nothing random is initialised
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    report = distshard.load(model, ckpt, device=device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None, init_sync=False)

    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), device=device,
                           generator=torch.Generator(device).manual_seed(dist.get_rank()))
    loss = ddp(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    if dist.get_rank() == 0:
        print(report.summary())
        print(f"one DDP step done, loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
