"""How low rank 0's planning and the plan's exchange can go in Python on this machine, beside
distshard's own, in one run (the many-tensor case's fixed cost, see docs/benchmarks.md).

    python benchmarks/planning_floor.py [--size many] [--ranks 2 4] [--rounds 3] [--json out.json]

Each rank builds the checkpoint's model on meta once, as compare.py does; then, in every round,
the planners take turns (in an order shuffled each round), every rank starting each one at a
barrier, the checkpoint's headers in the page cache, in one process per rank for all rounds
(transformers builds its table of conversions once per process: in the first round):

  distshard    the planning phase of ``distshard.load`` (``distshard.loader._plan``: every rank
               inspects its model, rank 0 validates the checkpoint and plans, all agree, rank 0
               sends the plan), read off the collective that sends the plan as compare.py reads
               it, with load's memory sampler running
  floor        only the passes no planner can skip, with no record per tensor, no memory
               sampler, and the fastest form of each that distshard knows: every rank walks its
               model's modules (names, shapes, dtypes, tied tensors once) and all-gathers a
               digest of them (in walk order, unsorted); rank 0 takes transformers' rules for the
               model, parses the headers of the files the index lists into lists, sends every
               key through transformers' ``rename_source_key`` as its own loader does (with the
               rules where one of their patterns is found in the key, else its base-model prefix
               step alone), checks shape and dtype, finds the missing keys, cuts each file into
               buckets of distshard's default size, and broadcasts the columns, pickled; the
               others unpickle them
  floor-bare   ``floor`` without the digest, the rules, the dtype and missing-key checks and the
               buckets

A floor is a lower bound, not a planner: no error paths, no conversions, no plan a reader could
use; it takes only safetensors checkpoints whose every key names one model tensor (the
``many`` sizes), and stops on any other. Rows: rank 0's planning (from the barrier to the plan
handed to the collective, before pickling) and the exchange (pickling, sending, unpickling: to
the last rank holding it), the median round by their sum.
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
from harness import (  # noqa: E402
    MANY_SIZES,
    START_METHOD,
    median_run,
    sample_checkpoint,
    say_start_method,
)

PLANNERS = ["distshard", "floor", "floor-bare"]


def _walk(model):
    """The model's modules (:func:`distshard.materialize.named_modules`), and the names, shapes
    and dtypes of its parameters and persistent buffers, a tied tensor once."""
    from distshard.materialize import named_modules

    modules = named_modules(model)
    names, shapes, dtypes, seen = [], [], [], set()
    for prefix, module in modules:
        dot = prefix + "." if prefix else ""
        for table, skipped in ((module._parameters, None),
                               (module._buffers, module._non_persistent_buffers_set)):
            for name, t in table.items():
                if t is None or (skipped and name in skipped) or id(t) in seen:
                    continue
                seen.add(id(t))
                names.append(dot + name)
                shapes.append(list(t.shape))
                dtypes.append(t.dtype)
    return modules, names, shapes, dtypes


def _floor(model, ckpt: str, full: bool, figures: dict) -> None:
    import hashlib
    import pickle

    import torch
    import torch.distributed as dist
    from transformers.core_model_loading import rename_source_key

    from distshard.index import SAFETENSORS_DTYPES
    from distshard.keys import key_rules
    from distshard.options import DEFAULT_BUCKET_SIZE
    from distshard.patterns import could_match

    rank, world = dist.get_rank(), dist.get_world_size()
    modules, names, shapes, dtypes = _walk(model)
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
        renamings, converters, found = [], [], None
        if full:  # transformers' rules, and the test of whether one can rename a key
            rules = key_rules(model, None, modules)
            renamings, converters = rules.renamings, rules.converters
            found = could_match([*renamings, *converters])
        present = dict.fromkeys(names, True)
        index = {n: i for i, n in enumerate(names)}
        prefix, files, formed = model.base_model_prefix, [], set()
        for number, name in enumerate(_files(ckpt)):
            with open(os.path.join(ckpt, name), "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            header.pop("__metadata__", None)
            begins, ends, targets = [], [], []
            for key, entry in header.items():
                target = pattern = None
                if found is not None and found(key):
                    target, pattern = rename_source_key(key, renamings, converters, prefix,
                                                        present)
                if target is None or (target not in present and key in present):
                    target, pattern = rename_source_key(key, [], [], prefix, present)
                i = index.get(target, -1)
                if pattern is not None or i < 0 or shapes[i] != entry["shape"] or (
                        full and SAFETENSORS_DTYPES[entry["dtype"]] is not dtypes[i]):
                    raise RuntimeError(f"{key!r} does not name one model tensor of its shape")
                begins.append(entry["data_offsets"][0])
                ends.append(entry["data_offsets"][1])
                targets.append(i)
            column = [name, "\n".join(header), begins, ends, targets, number % world]
            formed.update(targets)
            if full:
                bucket, start, cut = [0] * len(begins), 0, 0
                for j in sorted(range(len(begins)), key=begins.__getitem__):
                    if ends[j] - start > DEFAULT_BUCKET_SIZE:
                        cut, start = cut + 1, begins[j]
                    bucket[j] = cut
                column.append(bucket)
            files.append(column)
        if full and len(formed) != len(names):
            raise RuntimeError(f"{len(names) - len(formed)} model tensors are missing")
        figures.update(plan_sent=time.perf_counter(), tensors=len(formed))
        payload = [pickle.dumps(files, protocol=pickle.HIGHEST_PROTOCOL)]
        figures["plan_bytes"] = len(payload[0])
    dist.broadcast_object_list(payload, src=0)
    if rank != 0:
        pickle.loads(payload[0])
    figures["plan_received"] = time.perf_counter()


def _files(ckpt: str) -> list[str]:
    """The safetensors files of the checkpoint: those its index lists, else its one file."""
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if not os.path.exists(index):
        return ["model.safetensors"]
    with open(index) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


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
        outcome = _plan(model, ckpt, Comm(None, timeout), LoadOptions(timeout=timeout),
                        torch.device("cpu"))[2]
    figures.update(probe.figures, tensors=len(outcome.loaded_keys))


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
    if min(args.ranks) < 2 or args.rounds < 1:
        parser.error("--ranks of 2 or more (one rank sends no plan) and --rounds of 1 or more")
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
                runs.append({"ranks": n, "planner": planner, "round": k,
                             "planning_seconds": planning, "exchange_seconds": exchange,
                             "seconds": planning + exchange, "plan_bytes": zero["plan_bytes"],
                             "tensors": zero["tensors"]})
            row = dict(median_run(runs), runs=runs)
            rows.append(row)
            print(f"{n:>5} {planner:<11} {row['planning_seconds']:>10.2f} "
                  f"{row['exchange_seconds']:>10.2f} {row['seconds']:>6.2f} "
                  f"{row['plan_bytes'] / 1e6:>8.2f}  "
                  f"{' '.join(f'{s:.2f}' for s in row['times'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(checkpoint=ckpt, start_method=START_METHOD, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
