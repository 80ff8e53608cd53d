"""How low rank 0's planning and the plan's exchange can go in Python on this machine, beside
distshard's own, in one run (the many-tensor case's fixed cost, see docs/benchmarks.md).

    python benchmarks/planning_floor.py [--size many] [--ranks 2 4] [--rounds 3] [--json out.json]

Each rank builds the checkpoint's model on meta once, as compare.py does; then, in every round,
the planners take turns (in a different order each round), every rank starting each one at a
barrier, the checkpoint's headers in the page cache:

  distshard    the planning phase of ``distshard.load`` (``distshard.loader._plan``: every rank
               inspects its model, rank 0 validates the checkpoint and plans, all agree, rank 0
               sends the plan), timed off the collective that sends the plan as compare.py does
  floor        only the passes no planner can skip, each the cheapest Python there is, no
               record per tensor: every rank walks its model's modules (names, shapes, dtypes,
               tied tensors once), hashes them and all-gathers the digest; rank 0 parses every
               header into lists, sends every key through transformers' ``rename_source_key``
               (its base-model prefix step, as its own loader does), checks shape and dtype,
               finds the missing keys, cuts each file into 64 MiB buckets, and pickles the
               columns, which it broadcasts and the others unpickle
  floor-bare   ``floor`` without the digest, the dtype and missing-key checks and the buckets

``floor`` is a lower bound, not a planner: it has no error paths, no conversions and no plan a
reader could use. Rows: rank 0's planning (from the barrier to the plan sent) and the exchange
(to the last rank holding it), the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import _meta_model, _PlanProbe  # noqa: E402
from harness import MANY_SIZES, START_METHOD, sample_checkpoint, say_start_method  # noqa: E402

PLANNERS = ["distshard", "floor", "floor-bare"]
BUCKET = 64 << 20


def _walk(model):
    """Names, shapes and dtypes of the model's parameters and persistent buffers, a tied
    tensor once, in ``named_modules`` order."""
    names, shapes, dtypes, seen = [], [], [], set()
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        dot = prefix + "." if prefix else ""
        if module._modules:
            stack.extend(reversed([(dot + n, c) for n, c in module._modules.items()
                                   if c is not None]))
        skip = module._non_persistent_buffers_set
        for table, persistent in ((module._parameters, None), (module._buffers, skip)):
            for name, t in table.items():
                if t is None or (persistent and name in persistent) or id(t) in seen:
                    continue
                seen.add(id(t))
                names.append(dot + name)
                shapes.append(list(t.shape))
                dtypes.append(t.dtype)
    return names, shapes, dtypes


def _floor(model, ckpt: str, full: bool, figures: dict) -> None:
    import hashlib
    import pickle

    import torch
    import torch.distributed as dist
    from transformers.core_model_loading import rename_source_key

    from distshard.index import SAFETENSORS_DTYPES

    rank, world = dist.get_rank(), dist.get_world_size()
    names, shapes, dtypes = _walk(model)
    if full:
        digest = hashlib.sha256("\n".join(names).encode())
        digest.update(repr(shapes).encode())
        digest.update(repr(dtypes).encode())
        mine = torch.tensor([int.from_bytes(digest.digest()[:7], "little")])
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine)
        if any(int(r) != int(mine) for r in rows):
            raise RuntimeError("the ranks' models differ")
    payload = [None]
    if rank == 0:
        present = dict.fromkeys(names, True)
        index = {n: i for i, n in enumerate(names)}
        prefix, files, formed = model.base_model_prefix, [], set()
        for number, name in enumerate(sorted(f for f in os.listdir(ckpt)
                                             if f.endswith(".safetensors"))):
            with open(os.path.join(ckpt, name), "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            header.pop("__metadata__", None)
            begins, ends, targets = [], [], []
            for key, entry in header.items():
                i = index.get(rename_source_key(key, [], [], prefix, present)[0], -1)
                if i < 0 or shapes[i] != entry["shape"] or (
                        full and SAFETENSORS_DTYPES[entry["dtype"]] is not dtypes[i]):
                    raise RuntimeError(f"{key!r} does not match the model")
                begins.append(entry["data_offsets"][0])
                ends.append(entry["data_offsets"][1])
                targets.append(i)
            column = [name, "\n".join(header), begins, ends, targets, number % world]
            if full:
                formed.update(targets)
                bucket, start, cut = [0] * len(begins), 0, 0
                for j in sorted(range(len(begins)), key=begins.__getitem__):
                    if ends[j] - start > BUCKET:
                        cut, start = cut + 1, begins[j]
                    bucket[j] = cut
                column.append(bucket)
            files.append(column)
        if full and len(formed) != len(names):
            raise RuntimeError(f"{len(names) - len(formed)} model tensors are missing")
        payload = [pickle.dumps(files, protocol=pickle.HIGHEST_PROTOCOL)]
        figures.update(plan_sent=time.perf_counter(), plan_bytes=len(payload[0]))
    dist.broadcast_object_list(payload, src=0)
    if rank != 0:
        pickle.loads(payload[0])
    figures["plan_received"] = time.perf_counter()


def _distshard(model, ckpt: str, figures: dict) -> None:
    from datetime import timedelta

    import torch

    from distshard.comm import Comm
    from distshard.loader import _plan
    from distshard.options import LoadOptions
    from distshard.record import paused_gc
    from distshard.report import PeakMemorySampler

    timeout = timedelta(minutes=10)
    with _PlanProbe() as probe, PeakMemorySampler(), paused_gc():  # as distshard.load runs it
        _plan(model, ckpt, Comm(None, timeout), LoadOptions(timeout=timeout),
              torch.device("cpu"))
    figures.update(probe.figures)


def _rank(rank: int, world_size: int, ckpt: str, rounds: int) -> list[dict]:
    import gc

    import torch.distributed as dist

    from distshard.record import paused_gc

    model = _meta_model(ckpt)
    out = []
    for k in range(rounds):
        for planner in random.Random(k).sample(PLANNERS, len(PLANNERS)):
            gc.collect()
            dist.barrier()
            figures = {"started": time.perf_counter()}
            if planner == "distshard":
                _distshard(model, ckpt, figures)
            else:
                with paused_gc():
                    _floor(model, ckpt, planner == "floor", figures)
            out.append(dict(planner=planner, round=k, **figures))
    return out


def main() -> int:
    from distshard.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", choices=sorted(MANY_SIZES), default="many")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    ckpt = sample_checkpoint(args.checkpoint, args.size)
    say_start_method()
    print(f"{'ranks':>5} {'planner':<11} {'planning s':>10} {'exchange s':>10} {'sum s':>6} "
          f"{'plan MB':>8}  rounds (sum s)", flush=True)
    rows = []
    for n in args.ranks:
        res = run_ranks(_rank, n, ckpt, args.rounds, timeout=1800, start_method=START_METHOD)
        for planner in PLANNERS:
            runs = []
            for k in range(args.rounds):
                zero, *others = [next(r for r in ranks if r["planner"] == planner
                                      and r["round"] == k) for ranks in res]
                planning = zero["plan_sent"] - zero["started"]
                exchange = max(r["plan_received"] for r in [zero, *others]) - zero["plan_sent"]
                runs.append(dict(ranks=n, planner=planner, round=k, planning_seconds=planning,
                                 exchange_seconds=exchange, plan_bytes=zero["plan_bytes"]))
            runs.sort(key=lambda r: r["planning_seconds"] + r["exchange_seconds"])
            row = dict(runs[len(runs) // 2], runs=runs)
            rows.append(row)
            total = row["planning_seconds"] + row["exchange_seconds"]
            every = " ".join(f"{r['planning_seconds'] + r['exchange_seconds']:.2f}"
                             for r in sorted(runs, key=lambda r: r["round"]))
            print(f"{n:>5} {planner:<11} {row['planning_seconds']:>10.2f} "
                  f"{row['exchange_seconds']:>10.2f} {total:>6.2f} "
                  f"{row['plan_bytes'] / 1e6:>8.2f}  {every}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(checkpoint=ckpt, start_method=START_METHOD, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
