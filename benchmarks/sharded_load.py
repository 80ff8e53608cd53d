"""FSDP2 (sharded) loads: peak private host memory per rank against its bound, and the two ways
a shard reaches its rank (read by the file's owner and sent, or read by the rank itself), timed
cold in the same run.

    python benchmarks/sharded_load.py [--size large] [--ranks 2 4] [--repeats 3] [--checkpoint DIR]

Writes a sample Llama-like checkpoint (``--size large`` is about 1.07 GB in fp32) unless one is
given. For each world size and mode it evicts the checkpoint from the page cache, spawns gloo
ranks that build the model on meta, apply ``fully_shard`` to every block and the root, load it
with distshard and touch every parameter byte. Time: slowest rank, from before the model is built
to the end of the touch. Memory: each rank's peak of RSS minus shared pages (RssAnon) during the
load, above its value at the start; the bound is 1.15 x (checkpoint bytes / ranks) + the staging
budget of two buckets. Exits non-zero if a rank exceeds it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import SIZES, START_METHOD, evict, sample_checkpoint, say_start_method  # noqa: E402

MODES = {"own": True, "sent": False}  # read_own_slices


def _rank(rank: int, world_size: int, ckpt: str, bucket_size: int, read_own: bool) -> dict:
    import torch
    from accelerate import init_empty_weights
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    import distshard

    config = AutoConfig.from_pretrained(ckpt)
    mesh = init_device_mesh("cpu", (world_size,))
    started = time.perf_counter()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = distshard.load(model, ckpt, bucket_size=bucket_size, read_own_slices=read_own,
                            log_summary=False)
    with torch.no_grad():
        touched = sum(float(p.to_local().sum()) for p in model.parameters())
    return dict(seconds=time.perf_counter() - started, peak=report.peak_host_memory,
                read=report.bytes_read, received=report.bytes_received, total=report.total_bytes_read,
                local=sum(p.to_local().nbytes for p in model.parameters()), touched=touched)


def main() -> int:
    from distshard import DEFAULT_BUCKET_SIZE
    from distshard.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-size", type=int, default=DEFAULT_BUCKET_SIZE)
    args = parser.parse_args()

    ckpt = sample_checkpoint(args.checkpoint, args.size)
    ok = True
    say_start_method()
    print(f"{'ranks':>5} {'mode':>4} {'rank':>4} {'ckpt MB':>8} {'local MB':>9} {'read MB':>8} "
          f"{'recv MB':>8} {'peak MB':>8} {'bound MB':>9} {'peak/share':>10}")
    times: dict[tuple[int, str], list[float]] = {}
    for n in args.ranks:
        for repeat in range(args.repeats):
            for mode, read_own in MODES.items():  # alternate modes: noise hits both alike
                evict(ckpt)
                results = run_ranks(_rank, n, ckpt, args.bucket_size, read_own, timeout=1800,
                                    start_method=START_METHOD)
                times.setdefault((n, mode), []).append(max(r["seconds"] for r in results))
                if repeat:
                    continue
                total = results[0]["total"]
                share, bound = total / n, total / n * 1.15 + 2 * args.bucket_size
                for rank, r in enumerate(results):
                    within = r["peak"] <= bound
                    ok &= within
                    print(f"{n:>5} {mode:>4} {rank:>4} {total / 1e6:>8.1f} {r['local'] / 1e6:>9.1f} "
                          f"{r['read'] / 1e6:>8.1f} {r['received'] / 1e6:>8.1f} {r['peak'] / 1e6:>8.1f} "
                          f"{bound / 1e6:>9.1f} {r['peak'] / share:>10.3f}{'' if within else '  OVER'}")
    print("\ncold load time, slowest rank, median of", args.repeats, "(seconds)")
    for n in args.ranks:
        own, sent = (statistics.median(times[n, m]) for m in MODES)
        print(f"  {n} ranks: own slices {own:.2f}  sent by reader {sent:.2f}  "
              f"sent/own = {sent / own:.2f}")
    print("every rank within its memory bound" if ok else "SOME RANK EXCEEDED ITS MEMORY BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
