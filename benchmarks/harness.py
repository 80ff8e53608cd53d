"""What the benchmarks share: the sample checkpoint, cold-cache eviction, the table and the chart."""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch_examples"))

from common import SIZES, write_sample  # noqa: E402

__all__ = ["HEADER", "MANY_SIZES", "SIZES", "chart", "evict", "finish_block", "measure",
           "median_run", "sample_checkpoint", "write_many"]

# Many small tensors (the fixed cost of a load against its tensor count): NLLB-MoE, whose experts
# are modules of their own (no conversion fuses them: every loader, DCP too, reads the keys
# save_pretrained writes), with tiny dims. name -> (layers per stack, experts per layer, shard
# size): "many" holds 100,149 tensors (15 MB of fp32 weights, 36 MB of files with their headers;
# 4 files), "many-tiny" 441.
MANY_SIZES = {
    "many": (4, 3125, "4MB"),
    "many-tiny": (1, 50, "20KB"),
}


def sample_checkpoint(path: str | None, size: str) -> str:
    """``path``, or a sample checkpoint of ``size`` (written once, in 200 MB shards): Llama-like,
    or Mixtral-like for the ``moe`` sizes (one tensor per expert, as ``save_pretrained`` writes
    it), or for the ``many`` sizes NLLB-MoE with many tiny experts (see :data:`MANY_SIZES`)."""
    if path:
        return path
    family = ("nllb-moe" if size in MANY_SIZES else "mixtral" if size.startswith("moe")
              else "llama")
    path = os.path.join(tempfile.gettempdir(), f"distshard-sample-{family}-{size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"writing a sample {size} checkpoint to {path} ...", flush=True)
        if size in MANY_SIZES:
            write_many(path + ".partial", size)
        else:
            write_sample(path + ".partial", size, max_shard_size="200MB")
        os.replace(path + ".partial", path)
    return path


def write_many(path: str, size: str = "many") -> str:
    """A checkpoint of many small tensors written by ``save_pretrained``: NLLB-MoE with
    ``MANY_SIZES[size]`` (every layer sparse; 8-wide experts, each two Linear layers with
    biases: four tensors per expert), random weights."""
    import torch
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    layers, experts, shard = MANY_SIZES[size]
    config = NllbMoeConfig(
        vocab_size=512, d_model=8, encoder_ffn_dim=8, decoder_ffn_dim=8, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=2, decoder_attention_heads=2,
        num_experts=experts, encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=4,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)
    torch.manual_seed(0)
    NllbMoeForConditionalGeneration(config).save_pretrained(path, max_shard_size=shard)
    return path


def evict(folder: str) -> None:
    """Drop the checkpoint's pages from the page cache (no root needed; dirty pages of a freshly
    written file are synced first, or they would stay)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# Measured ranks start as new interpreters, as torchrun starts them (distshard.testing's default
# forks them from a server that has imported torch: faster to start, but the ranks would share
# its pages, copy-on-write, during the timed load). The tests, which check that the harness runs
# and that the loaders agree but never read a time, ask for the fork server
# (DISTSHARD_BENCH_START_METHOD=forkserver); the output then says that its times are not figures.
START_METHOD = os.environ.get("DISTSHARD_BENCH_START_METHOD", "spawn")


def say_start_method() -> None:
    """Print a line saying so when the ranks do not start as new interpreters."""
    if START_METHOD != "spawn":
        print(f"ranks start by {START_METHOD} (DISTSHARD_BENCH_START_METHOD): the times below "
              "are not figures; only runs that start ranks by spawn are", flush=True)

HEADER = (f"{'scenario':<9} {'mode':<10} {'ranks':>5} {'loader':<13} {'time s':>7} "
          f"{'x fastest peer':>14} {'x bound':>7} {'peak MB/rank':>12} {'disk MB':>8} "
          f"{'max rank MB':>11} {'write s':>7} {'checksum':>14}")


def measure(row: dict, job) -> dict:
    """Run ``job()`` (a loader on every rank; returns each rank's figures) and fold the figures
    into ``row``: the slowest rank's time, the largest peak, the disk's reads during the job."""
    import psutil

    before = psutil.disk_io_counters().read_bytes
    try:
        res = job()
    except Exception as e:  # a peer that cannot do this case is reported, not fatal
        return dict(row, error=str(e)[-300:])
    row = dict(row, seconds=max(r["seconds"] for r in res), peak=max(r["peak"] for r in res),
               disk=psutil.disk_io_counters().read_bytes - before,
               rank_read=max(r["rank_read"] for r in res),
               write_seconds=max(r["write_seconds"] for r in res), checksum=res[0]["checksum"],
               digest=res[0].get("digest"))
    if "load_seconds" in res[0]:  # distshard's own figures (see compare.py)
        row["load_seconds"] = max(r["load_seconds"] for r in res)
    if "plan_bytes" in res[0]:  # rank 0 sent the plan (one clock: CLOCK_MONOTONIC, one machine)
        row.update(planning_seconds=res[0]["plan_sent"] - res[0]["load_started"],
                   exchange_seconds=max(r["plan_received"] for r in res) - res[0]["plan_sent"],
                   plan_bytes=res[0]["plan_bytes"])
    return row


def finish_block(block: list[dict], bound_seconds: float) -> None:
    """Add the ratios to one group of rows (same scenario, mode and ranks) and print them.

    ``x fastest peer``: time over the fastest other loader's; ``x bound``: time over
    ``bound_seconds`` (the checkpoint at the scenario's storage bandwidth)."""
    peers = [r["seconds"] for r in block
             if "seconds" in r and not r["loader"].startswith("distshard")]
    for r in block:
        if "error" in r:
            print(f"{r['scenario']:<9} {r['mode']:<10} {r['ranks']:>5} {r['loader']:<13} failed: "
                  f"{r['error'][-120:]!r}", flush=True)
            continue
        r["vs_fastest_peer"] = r["seconds"] / min(peers) if peers else float("nan")
        r["vs_bound"] = r["seconds"] / bound_seconds
        print(f"{r['scenario']:<9} {r['mode']:<10} {r['ranks']:>5} {r['loader']:<13} "
              f"{r['seconds']:>7.2f} {r['vs_fastest_peer']:>14.2f} {r['vs_bound']:>7.2f} "
              f"{r['peak'] / 1e6:>12.1f} {r['disk'] / 1e6:>8.1f} {r['rank_read'] / 1e6:>11.1f} "
              f"{r['write_seconds']:>7.2f} {r['checksum']:>14.4f}", flush=True)


def chart(rows: list[dict], path: str, title: str) -> None:
    """Grouped bars of load time and peak private memory per rank, one group per scenario, mode
    and ranks, one bar per loader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "seconds" in r]
    groups = list(dict.fromkeys((r["scenario"], r["mode"], r["ranks"]) for r in ok))
    loaders = list(dict.fromkeys(r["loader"] for r in ok))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.6 * len(groups) + 2), 7), sharex=True)
    width = 0.8 / max(1, len(loaders))
    for i, loader in enumerate(loaders):
        xs, times, peaks = [], [], []
        for g, key in enumerate(groups):
            row = next((r for r in ok if (r["scenario"], r["mode"], r["ranks"]) == key
                        and r["loader"] == loader), None)
            if row is not None:
                xs.append(g + (i - (len(loaders) - 1) / 2) * width)
                times.append(row["seconds"])
                peaks.append(row["peak"] / 1e6)
        axes[0].bar(xs, times, width, label=loader)
        axes[1].bar(xs, peaks, width, label=loader)
    axes[0].set_ylabel("load time, slowest rank (s)")
    axes[1].set_ylabel("peak private memory per rank (MB)")
    axes[1].set_xticks(range(len(groups)))
    axes[1].set_xticklabels([f"{s}\n{m}\n{n} ranks" for s, m, n in groups])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(loaders),
               fontsize="small")
    axes[0].set_title(title, fontsize="medium")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def median_run(runs: list[dict]) -> dict:
    """Of one loader's repeated runs, the one of median time, with every run's time in
    ``times`` (a run that failed is the row if any did: a failure is not hidden by a repeat)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return dict(ordered[(len(ordered) - 1) // 2], times=[r["seconds"] for r in runs])
