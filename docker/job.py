"""The multi-node job: every rank loads the checkpoint with distshard, replicated (each byte
read once per job, then each node reading it once: ``locality="node"``) and sharded with FSDP2,
and checks each bitwise against transformers' single-process ``from_pretrained`` of the same
folder. One line per rank with the bytes each node read in both localities, then exit 0 only if
all are equal.

    docker/node.sh NODE_RANK      # starts this under torchrun; see docker/compose.yaml

Each torchrun agent sets GROUP_RANK (its node rank) for its ranks; distshard names nodes by it,
so the two agents are two nodes even when they run on one machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from distshard.hf import from_pretrained
from distshard.testing import end_job
from distshard.topology import node_name


def first_difference(model: torch.nn.Module, reference: torch.nn.Module) -> str | None:
    """The first parameter or buffer that is not bitwise equal to the reference's, or None.
    Sharded tensors are gathered (a collective: every rank walks the names in one order)."""
    got = dict(model.named_parameters()) | dict(model.named_buffers())
    want = dict(reference.named_parameters()) | dict(reference.named_buffers())
    if sorted(got) != sorted(want):
        return f"names differ: {sorted(set(got) ^ set(want))}"
    difference = None
    for key in sorted(want):
        value = got[key].full_tensor() if isinstance(got[key], DTensor) else got[key]
        if difference is None and not (value.dtype == want[key].dtype
                                       and torch.equal(value, want[key])):
            difference = key
    return difference


def main() -> NoReturn:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    ckpt = parser.parse_args().checkpoint
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    nodes = len(set(_all_gather(node_name())))

    reference = AutoModelForCausalLM.from_pretrained(ckpt)  # what one process alone would get
    model, report = from_pretrained(AutoModelForCausalLM, ckpt, return_report=True)
    replicated = first_difference(model, reference)
    # each node reads the whole checkpoint itself, shared among its ranks; nothing crosses nodes
    model, local = from_pretrained(AutoModelForCausalLM, ckpt, return_report=True,
                                   locality="node")
    replicated = replicated or first_difference(model, reference)
    mesh = init_device_mesh("cpu", (world,))
    sharded = first_difference(from_pretrained(AutoModelForCausalLM, ckpt, device_mesh=mesh),
                               reference)
    ok = replicated is None and sharded is None
    if rank == 0:  # (one write per line, as below)
        sys.stdout.write(report.summary() + "\n")
        sys.stdout.flush()
    line = (f"distshard-job rank={rank} world={world} node={os.environ.get('GROUP_RANK')} "
          f"local_rank={os.environ.get('LOCAL_RANK')} nodes={nodes} "
          f"tensors={len(report.loaded_keys)} bytes_read={report.bytes_read} "
          f"per_node_cluster={_csv(report.bytes_read_per_node)} "
          f"per_node_node={_csv(local.bytes_read_per_node)} "
          f"replicated={'bitwise-equal' if replicated is None else 'DIFFERS:' + replicated} "
          f"fsdp2={'bitwise-equal' if sharded is None else 'DIFFERS:' + sharded} "
          "(against single-process transformers from_pretrained)\n")
    # one write of the whole line (under PIPE_BUF: atomic), so that two ranks sharing the
    # agent's stdout never interleave within a line (print writes the text and "\n" apart)
    sys.stdout.write(line)
    sys.stdout.flush()
    results = _all_gather(ok)
    end_job(0 if all(results) else 1)  # barrier, destroy the process group, exit


def _csv(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def _all_gather(obj: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


if __name__ == "__main__":
    main()
