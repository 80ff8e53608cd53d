"""One node, local disk (scenario S1): distshard against the other loaders, in one run, cold.

    python benchmarks/compare.py [--size large] [--ranks 2 4] [--modes replicated sharded]
                                 [--repeats 3] [--json out.json] [--chart out.png]

Every loader runs in the same harness: gloo ranks spawned with a file rendezvous, the checkpoint
(a sample Llama-like model written by ``save_pretrained``; ``--size large`` is 1.07 GB in fp32;
``--size many`` is 100,152 tensors of NLLB-MoE's tiny experts, for the fixed cost per tensor)
evicted from the page cache before each run. Time: slowest rank, from a barrier that every rank
passes once its imports are done (before the model is built) to the end of a pass that touches every parameter byte (mmap-lazy loaders pay their page faults
there). Memory: each rank's peak of RSS minus shared pages during that time, above its start.
Disk: bytes the block device read during the run (system-wide); max rank: the most any one rank
caused to be read from storage (/proc/self/io read_bytes). Write: after the clock stops, the
first in-place write of every parameter (an optimizer step's effect): loaders whose tensors are
file-backed mmaps pay their private copy there. Checksum: the sum of every
parameter, which must agree across loaders; each row also keeps a digest of every parameter's
name and bytes, and a group whose loaders' digests differ is named (bitwise agreement). Ratios are against the fastest peer of the same row
group and against the cold-read bound (checkpoint bytes / one reader's cold sequential read rate,
the better of two passes); the bounds (cold read, memcpy, gloo broadcast) are measured first, in
the same run. With ``--repeats N`` every loader of a row group runs N times, the loaders taking
turns in a different order each round (a seeded shuffle: the machine's drift reaches them all
alike, and no loader always runs right after the same one -- here, a loader that follows one
that freed gigabytes of private memory runs up to 0.2 s slower), and each row is the run of
median time (the JSON keeps every time).

For distshard the run also records where its own time goes: the time inside ``distshard.load``
(slowest rank; the rest is building the meta model, which every loader but transformers' does
the same way: parameters on meta, buffers real, weights not initialised, as ``from_pretrained``
skips them), rank 0's planning (from the call to the plan being sent: inspecting the model,
reading every header, matching, planning), the plan's exchange (from rank 0 sending it to the
last rank holding it) and its size (the pickled bytes each rank receives), read off the
collective that sends it.

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
import hashlib
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    HEADER,
    MANY_SIZES,
    SIZES,
    START_METHOD,
    chart,
    evict,
    finish_block,
    measure,
    median_run,
    sample_checkpoint,
    say_start_method,
)

LOADERS = ["distshard", "transformers", "accelerate", "rank0-bcast", "dcp"]


def _auto_class(config):
    """The Auto class that builds ``config``'s model: causal LM, else sequence-to-sequence."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForSeq2SeqLM


def _meta_model(ckpt):
    """The checkpoint's model with parameters on meta and buffers real, weights not initialised
    (``from_pretrained`` does not initialise the weights of a model it builds on meta either;
    torch's initialisers cost about 0.5 ms per meta tensor here), ties in place."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(ckpt)
    with init_empty_weights(), no_init_weights():
        model = _auto_class(config).from_config(config)
    model.tie_weights()
    return model


def _shard(model, world_size):
    """``fully_shard`` of every block (the classes the model names as not to be split) and of
    the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    blocks = set(model._no_split_modules or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class _PlanProbe:
    """Reads distshard's plan off the one collective that sends it (``Comm.broadcast_object``,
    whose first call in a load sends rank 0's plan): when this rank entered it (rank 0: the plan
    is made), when it left it (the plan unpickled here), and the pickled bytes rank 0 sent."""

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}

    def __enter__(self) -> _PlanProbe:
        from distshard.comm import Comm

        broadcast, to_bytes = self.saved = Comm.broadcast_object, Comm._to_bytes
        figures, sending = self.figures, []

        def broadcast_object(comm, obj, src=0):
            if "plan_sent" in figures:
                return broadcast(comm, obj, src)
            figures["plan_sent"] = time.perf_counter()
            sending.append(True)
            try:
                return broadcast(comm, obj, src)
            finally:
                sending.clear()
                figures["plan_received"] = time.perf_counter()

        def _to_bytes(comm, obj):
            data = to_bytes(comm, obj)
            if sending:
                figures["plan_bytes"] = data.numel()
            return data

        Comm.broadcast_object, Comm._to_bytes = broadcast_object, _to_bytes
        return self

    def __exit__(self, *exc) -> None:
        from distshard.comm import Comm

        Comm.broadcast_object, Comm._to_bytes = self.saved


def _load(loader: str, ckpt: str, sharded: bool, rank: int, world_size: int,
          figures: dict | None = None):
    import distshard
    from transformers import AutoConfig

    auto = _auto_class(AutoConfig.from_pretrained(ckpt))
    if loader in ("distshard", "distshard-node"):
        model = _meta_model(ckpt)
        if sharded:
            _shard(model, world_size)
        locality = "node" if loader == "distshard-node" else "cluster"
        with _PlanProbe() as probe:
            started = time.perf_counter()
            distshard.load(model, ckpt, log_summary=False, locality=locality)
        if figures is not None:
            figures.update(probe.figures, load_started=started,
                           load_seconds=time.perf_counter() - started)
        return model
    if loader == "transformers":
        model = auto.from_pretrained(ckpt)
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
        full = auto.from_pretrained(ckpt).state_dict() if rank == 0 else {}
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
        tied = getattr(model, "all_tied_weights_keys", None) or {}  # save_pretrained drops them
        state = {k: v for k, v in model.state_dict().items() if k not in tied}
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
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig

    from distshard.report import PeakMemorySampler

    config = AutoConfig.from_pretrained(ckpt)
    _auto_class(config)._model_mapping[type(config)]  # imports the architecture's modules

    # Every rank starts the clock together (the imports above take each rank a different time,
    # up to 0.2 s here): a loader with collectives would otherwise be charged for its peers'
    # late arrival, which is the harness's, not the loader's.
    torch.distributed.barrier()
    io_before = psutil.Process().io_counters().read_bytes
    with PeakMemorySampler() as memory:
        started = time.perf_counter()
        figures: dict[str, float] = {}
        model = _load(loader, ckpt, sharded, rank, world_size, figures)
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
    checksum, digest = 0.0, hashlib.sha256()  # the digest: every parameter's name and bytes
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            checksum += float(full.double().sum())
            digest.update(name.encode())
            digest.update(full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return dict(seconds=seconds, peak=memory.peak_above_baseline, checksum=checksum,
                digest=digest.hexdigest(),
                touched=touched, rank_read=rank_read, write_seconds=write_seconds, **figures)


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


def count_tensors(ckpt: str) -> int:
    """The checkpoint's tensor count, from its headers."""
    from distshard.index import describe_file, find_checkpoint

    found = find_checkpoint(ckpt)
    return sum(len(describe_file(found.root, name, found.kind).tensors) for name in found.files)


def per_tensor(row: dict, tensors: int) -> None:
    """Add and print a distshard row's costs per tensor: its load, ``distshard.load`` alone,
    rank 0's planning and the plan's exchange (see the module's docstring)."""
    if "load_seconds" not in row:
        return
    for name in ("seconds", "load_seconds", "planning_seconds", "exchange_seconds"):
        if name in row:
            row[name.replace("seconds", "us_per_tensor")] = row[name] / tensors * 1e6
    line = (f"{'':9} {row['mode']:<10} {row['ranks']:>5} {row['loader']:<13} "
            f"distshard.load {row['load_seconds']:.2f} s ({row['load_us_per_tensor']:.1f} us per "
            f"tensor; whole run {row['us_per_tensor']:.1f})")
    if "planning_seconds" in row:
        line += (f"; rank 0 planned in {row['planning_seconds']:.2f} s "
                 f"({row['planning_us_per_tensor']:.1f} us per tensor), plan exchange "
                 f"{row['exchange_seconds']:.2f} s, plan {row['plan_bytes'] / 1e6:.2f} MB per rank")
    print(line, flush=True)


def main() -> int:

    from distshard.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", choices=sorted(SIZES) + sorted(MANY_SIZES), default="large")
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
    tensors = count_tensors(ckpt)
    rows = []
    limits = {n: bounds(ckpt, n) for n in args.ranks}
    print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB, {tensors} tensors")
    say_start_method()
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
                        _rank, n, loader, ckpt, mode == "sharded", timeout=1200,
                        start_method=START_METHOD)))
            block = [median_run(r) for r in runs.values()]
            finish_block(block, size / limits[n]["disk"])
            for r in block:
                per_tensor(r, tensors)
            digests = {r["loader"]: r["digest"] for r in block if r.get("digest")}
            if len(set(digests.values())) > 1:
                print(f"{'':9} {mode:<10} {n:>5} the loaders' parameters differ bitwise: "
                      f"{digests}", flush=True)
            rows += block
    if args.chart:
        chart(rows, args.chart, f"S1, one node: {size / 1e9:.2f} GB checkpoint, cold")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(checkpoint_bytes=size, tensors=tensors, bounds=limits, rows=rows,
                           start_method=START_METHOD), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
