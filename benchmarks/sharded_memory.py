"""Peak private host memory per rank during an FSDP2 (sharded) load, against its bound.

    python benchmarks/sharded_memory.py [--size large] [--ranks 2 4] [--checkpoint DIR]

Writes a sample Llama-like checkpoint (``--size large`` is about 1.06 GB in fp32) unless one is
given, then for each world size spawns gloo ranks that build the model on meta, apply
``fully_shard`` to every block and the root, and load it with distshard. Each rank's figure is
the peak of RSS minus shared pages (RssAnon) during the load, above its value at the start. The
bound is 1.15 x (checkpoint bytes / ranks) + the staging budget (two buckets: the bucket being
read and the slices cut from it). Exits non-zero if a rank exceeds it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch_examples"))


def _rank(rank: int, world_size: int, ckpt: str, bucket_size: int) -> dict:
    from accelerate import init_empty_weights
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    import distshard

    mesh = init_device_mesh("cpu", (world_size,))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    model.tie_weights()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = distshard.load(model, ckpt, bucket_size=bucket_size, log_summary=False)
    local = sum(p.to_local().nbytes for p in model.parameters())
    return dict(peak=report.peak_host_memory, read=report.bytes_read, received=report.bytes_received,
                local=local, seconds=report.seconds, total=report.total_bytes_read)


def main() -> int:
    from common import SIZES, write_sample

    from distshard import DEFAULT_BUCKET_SIZE
    from distshard.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--bucket-size", type=int, default=DEFAULT_BUCKET_SIZE)
    args = parser.parse_args()

    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(tempfile.gettempdir(), f"distshard-sample-llama-{args.size}")
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            print(f"writing a sample {args.size} checkpoint to {ckpt} ...", flush=True)
            write_sample(ckpt + ".partial", args.size, max_shard_size="200MB")
            os.replace(ckpt + ".partial", ckpt)
    ok = True
    print(f"{'ranks':>5} {'rank':>4} {'checkpoint MB':>13} {'local MB':>9} {'received MB':>11} "
          f"{'peak MB':>8} {'bound MB':>9} {'peak/share':>10}")
    for n in args.ranks:
        results = run_ranks(_rank, n, ckpt, args.bucket_size, timeout=1800)
        total = results[0]["total"]
        share = total / n
        bound = 1.15 * share + 2 * args.bucket_size
        for rank, r in enumerate(results):
            within = r["peak"] <= bound
            ok &= within
            print(f"{n:>5} {rank:>4} {total / 1e6:>13.1f} {r['local'] / 1e6:>9.1f} "
                  f"{r['received'] / 1e6:>11.1f} {r['peak'] / 1e6:>8.1f} {bound / 1e6:>9.1f} "
                  f"{r['peak'] / share:>10.3f}{'' if within else '  OVER'}")
    print("every rank within its bound" if ok else "SOME RANK EXCEEDED ITS BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
