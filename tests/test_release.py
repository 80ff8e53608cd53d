"""A deleted model gives its memory back: after ``del model`` and a garbage collection, no route
leaves a mapping, buffer, descriptor or thread of its load behind.

One job of two ranks loads through every route in turn (the checkpoint's page cache, the node
image in /dev/shm, the backend broadcast, own rows of FSDP2 shards, slices sent by the reader),
writes every parameter (so that copy-on-write views get private pages), deletes the model, and
checks that private memory (RssAnon), open descriptors, mappings of the checkpoint or of an
image, distshard threads and /dev/shm are back where they were before that load."""

from __future__ import annotations

import ctypes
import gc
import glob
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

import distshard
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess

DEADLINE = 240
LAYERS, SIZE = 12, 1024  # 48 MiB of float32: well above the noise of one process's heap
MODEL_BYTES = LAYERS * SIZE * SIZE * 4

ROUTES = {  # load() arguments, and whether the model is sharded with FSDP2
    "page_cache": (dict(map_checkpoint=True), False),
    "node_image": (dict(map_checkpoint=False, shared_memory=True), False),
    "broadcast": (dict(shared_memory=False), False),
    "own_rows": (dict(read_own_slices=True), True),
    "slices": (dict(read_own_slices=False), True),
}


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(SIZE, SIZE, bias=False, device="meta") for _ in range(LAYERS))


def _build(sharded: bool) -> torch.nn.Module:
    model = _Model()
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _state(path: str) -> dict:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))
    with open("/proc/self/maps") as f:
        maps = sorted({line.split()[-1] for line in f if path in line or "distshard-" in line})
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
        except FileNotFoundError:  # (the listing's own descriptor, closed by now)
            pass
    return dict(rss=rss, fds=sorted(fds), maps=maps,
                threads=sorted(t.name for t in threading.enumerate()
                               if t.name.startswith("distshard")),
                shm=sorted(glob.glob("/dev/shm/distshard-*")))


def _load_write_delete(rank: int, world_size: int, path: str) -> dict:
    out = {}
    # What stays for good once used, and is not a load's: torch's FSDP2 and DTensor machinery
    # (about 29 MB here on its first use, distshard or not), and a first load's imports.
    model = _build(True)
    model.to_empty(device="cpu")
    del model
    model = _build(False)
    distshard.load(model, path, log_summary=False)
    del model
    for route, (kwargs, sharded) in ROUTES.items():
        before = _state(path)
        model = _build(sharded)
        report = distshard.load(model, path, log_summary=False, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).add_(1)
        loaded = _state(path)
        del model, p
        after = _state(path)
        out[route] = dict(before=before, loaded=loaded, after=after, shared=report.shared_copy)
    return out


def test_every_route_gives_back_what_its_load_took(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({f"layers.{i}.weight": torch.randn(SIZE, SIZE, generator=g) for i in range(LAYERS)},
              str(tmp_path / "model.safetensors"))
    results = run_ranks(_load_write_delete, 2, str(tmp_path), timeout=DEADLINE)
    for rank, result in enumerate(results):
        assert result["page_cache"]["shared"] == "files"
        assert result["node_image"]["shared"] == "shm"
        for route, r in result.items():
            before, loaded, after = r["before"], r["loaded"], r["after"]
            where = f"rank {rank}, {route}"
            share = MODEL_BYTES // (2 if ROUTES[route][1] else 1)
            # the measure sees the model: its written parameters are private memory
            assert loaded["rss"] - before["rss"] > share // 2, where
            assert after["rss"] - before["rss"] < share // 8, (where, before, after)
            for what in ("maps", "threads", "shm"):
                assert after[what] == before[what], (where, what, before[what], after[what])
            # no descriptor opened since is still open (one held before may close meanwhile:
            # gloo's connections between the ranks are gloo's own)
            assert set(after["fds"]) <= set(before["fds"]), (where, before["fds"], after["fds"])
