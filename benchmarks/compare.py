"""One node, local disk (scenario S1): distshard against the other loaders, in one run, cold.

    python benchmarks/compare.py [--size large] [--ranks 2 4] [--modes replicated sharded]
                                 [--repeats 3] [--json out.json] [--chart out.png]

Every loader runs in the same harness: gloo ranks spawned with a file rendezvous, the checkpoint
(a sample Llama-like model written by ``save_pretrained``; ``--size large`` is 1.07 GB in fp32)
evicted from the page cache before each run. Time: slowest rank, from a barrier that every rank
passes once its imports are done (before the model is built) to the end of a pass that touches every parameter byte (mmap-lazy loaders pay their page faults
there). Memory: each rank's peak of RSS minus shared pages during that time, above its start.
Disk: bytes the block device read during the run (system-wide); max rank: the most any one rank
caused to be read from storage (/proc/self/io read_bytes). Write: after the clock stops, the
first in-place write of every parameter (an optimizer step's effect): loaders whose tensors are
file-backed mmaps pay their private copy there. Checksum: the sum of every
parameter, which must agree across loaders. Ratios are against the fastest peer of the same row
group and against the cold-read bound (checkpoint bytes / one reader's cold sequential read rate,
the better of two passes); the bounds (cold read, memcpy, gloo broadcast) are measured first, in
the same run. With ``--repeats N`` every loader of a row group runs N times, the loaders taking
turns in a different order each round (a seeded shuffle: the machine's drift reaches them all
alike, and no loader always runs right after the same one -- here, a loader that follows one
that freed gigabytes of private memory runs up to 0.2 s slower), and each row is the run of
median time (the JSON keeps every time).

Loaders (``sharded``: each is followed by ``fully_shard`` of every block and the root, except
distshard and DCP, which load straight into the sharded model):
  distshard      distshard.load into the meta model
  transformers   AutoModelForCausalLM.from_pretrained on every rank
  accelerate     init_empty_weights + load_checkpoint_in_model on every rank
  rank0-bcast    rank 0 from_pretrained; set_model_state_dict(full_state_dict, broadcast_from_rank0)
  dcp            torch.distributed.checkpoint.load with HuggingFaceStorageReader
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    HEADER,
    SIZES,
    chart,
    evict,
    finish_block,
    measure,
    median_run,
    sample_checkpoint,
)

LOADERS = ["distshard", "transformers", "accelerate", "rank0-bcast", "dcp"]


def _meta_model(ckpt):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    model.tie_weights()
    return model


def _shard(model, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _load(loader: str, ckpt: str, sharded: bool, rank: int, world_size: int):
    import distshard

    if loader in ("distshard", "distshard-node"):
        model = _meta_model(ckpt)
        if sharded:
            _shard(model, world_size)
        locality = "node" if loader == "distshard-node" else "cluster"
        distshard.load(model, ckpt, log_summary=False, locality=locality)
        return model
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt)
        return _shard(model, world_size) if sharded else model
    if loader == "accelerate":
        from accelerate import load_checkpoint_in_model

        model = _meta_model(ckpt)
        load_checkpoint_in_model(model, ckpt, device_map={"": "cpu"})
        model.tie_weights()
        return _shard(model, world_size) if sharded else model
    if loader == "rank0-bcast":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(ckpt).state_dict() if rank == 0 else {}
        model = _meta_model(ckpt)
        if sharded:
            _shard(model, world_size)
        model.to_empty(device="cpu")
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=True))
        model.tie_weights()
        return model
    if loader == "dcp":
        import torch.distributed.checkpoint as dcp

        model = _meta_model(ckpt)
        if sharded:
            _shard(model, world_size)
        model.to_empty(device="cpu")
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
                 or not model.config.tie_word_embeddings}
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(ckpt))
        model.tie_weights()
        return model
    raise ValueError(loader)


def _rank(rank: int, world_size: int, loader: str, ckpt: str, sharded: bool) -> dict:
    # Import every loader's modules first: the clock and the memory sampler start after them.
    import accelerate  # noqa: F401
    import psutil
    import torch
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch.distributed.tensor import DTensor

    from distshard.report import PeakMemorySampler

    # Every rank starts the clock together (the imports above take each rank a different time,
    # up to 0.2 s here): a loader with collectives would otherwise be charged for its peers'
    # late arrival, which is the harness's, not the loader's.
    torch.distributed.barrier()
    io_before = psutil.Process().io_counters().read_bytes
    with PeakMemorySampler() as memory:
        started = time.perf_counter()
        model = _load(loader, ckpt, sharded, rank, world_size)
        with torch.no_grad():  # touch every byte this rank holds, allocating nothing large
            local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
            touched = sum(float(t.sum()) for t in local)
        seconds = time.perf_counter() - started
    rank_read = psutil.Process().io_counters().read_bytes - io_before
    # Not part of the load time: the first in-place write of every parameter (what an optimizer
    # step does), where loaders that hand out file-backed tensors pay their copy.
    started = time.perf_counter()
    with torch.no_grad():
        for t in local:
            t.mul_(1)
    write_seconds = time.perf_counter() - started
    with torch.no_grad():
        checksum = sum(float((p.full_tensor() if isinstance(p, DTensor) else p).double().sum())
                       for p in model.parameters())
    return dict(seconds=seconds, peak=memory.peak_above_baseline, checksum=checksum,
                touched=touched, rank_read=rank_read, write_seconds=write_seconds)


def _broadcast_rank(rank: int, world_size: int, nbytes: int) -> float:
    import torch
    import torch.distributed as dist

    buf = torch.ones(nbytes, dtype=torch.uint8)
    dist.broadcast(buf, src=0)  # warm the connections
    dist.barrier()
    started = time.perf_counter()
    dist.broadcast(buf, src=0)
    dist.barrier()
    return time.perf_counter() - started


def cold_read(ckpt: str) -> float:
    """Cold sequential read of the checkpoint by one reader (bytes/second)."""
    evict(ckpt)
    names = [os.path.join(ckpt, f) for f in sorted(os.listdir(ckpt))]
    buf = bytearray(64 << 20)
    started, total = time.perf_counter(), 0
    for name in names:
        with open(name, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / (time.perf_counter() - started)


def bounds(ckpt: str, world_size: int) -> dict[str, float]:
    """The machine's limits, measured now: cold sequential read of the checkpoint by one
    reader (the better of two passes), memcpy, and gloo's broadcast of 256 MiB to
    ``world_size`` ranks (bytes/second)."""
    import torch

    from distshard.testing import run_ranks

    disk = max(cold_read(ckpt), cold_read(ckpt))
    a, b = torch.empty(256 << 20, dtype=torch.uint8), torch.ones(256 << 20, dtype=torch.uint8)
    a.copy_(b)
    started = time.perf_counter()
    for _ in range(4):
        a.copy_(b)
    memcpy = 4 * a.numel() / (time.perf_counter() - started)
    seconds = max(run_ranks(_broadcast_rank, world_size, 256 << 20, timeout=300))
    return dict(disk=disk, memcpy=memcpy, broadcast=(256 << 20) / seconds)


def main() -> int:

    from distshard.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--modes", nargs="+", default=["replicated", "sharded"])
    parser.add_argument("--loaders", nargs="+", default=LOADERS)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each loader per row group; the row is the median one")
    parser.add_argument("--json")
    parser.add_argument("--chart", help="write a PNG chart here")
    args = parser.parse_args()
    ckpt = sample_checkpoint(args.checkpoint, args.size)
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    rows = []
    limits = {n: bounds(ckpt, n) for n in args.ranks}
    print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB")
    for n, b in limits.items():
        print(f"bounds with {n} ranks: cold read {b['disk'] / 1e9:.2f} GB/s (checkpoint in "
              f"{size / b['disk']:.2f} s), memcpy {b['memcpy'] / 1e9:.2f} GB/s, gloo broadcast "
              f"{b['broadcast'] / 1e9:.2f} GB/s")
    print(HEADER)
    for mode in args.modes:
        for n in args.ranks:
            runs = {loader: [] for loader in args.loaders}
            for k in range(args.repeats):
                for loader in random.Random(k).sample(args.loaders, len(args.loaders)):
                    evict(ckpt)
                    row = dict(scenario="S1", mode=mode, ranks=n, loader=loader)
                    runs[loader].append(measure(row, lambda: run_ranks(
                        _rank, n, loader, ckpt, mode == "sharded", timeout=1200)))
            block = [median_run(r) for r in runs.values()]
            finish_block(block, size / limits[n]["disk"])
            rows += block
    if args.chart:
        chart(rows, args.chart, f"S1, one node: {size / 1e9:.2f} GB checkpoint, cold")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(checkpoint_bytes=size, bounds=limits, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
