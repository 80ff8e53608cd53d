"""The shared-memory exchange between a node's ranks, and several nodes simulated on one machine.

Nodes are told apart with ``DISTSHARD_NODE`` (set by each rank before it loads); the ranks of
different "nodes" then pass buckets point to point over gloo and share nothing through
``/dev/shm``, as on separate machines.
"""

from __future__ import annotations

import glob
import logging
import os

import pytest
import safetensors.torch
from checkpoints import CASES, assert_same, empty_model, reference
from test_load_dist import DEADLINE, SMALL_BUCKET, unique_bytes

import distshard
import distshard.shm
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess


def _images_left() -> set[str]:
    return set(glob.glob(os.path.join(distshard.shm.SHM_DIR, "distshard-*")))


def _load_on_nodes(rank: int, world_size: int, paths: dict[str, str], nodes: list[int]) -> dict:
    os.environ["DISTSHARD_NODE"] = str(nodes[rank])
    out = {}
    for shared_memory in (True, False):
        for name, path in paths.items():
            model = empty_model(CASES[name][0])
            report = distshard.load(model, path, bucket_size=SMALL_BUCKET,
                                    shared_memory=shared_memory)
            ref = reference(name, path)
            assert_same(model, ref, f"{name} on rank {rank}, nodes {nodes}, shm {shared_memory}")
            out[name, shared_memory] = dict(read=report.bytes_read, received=report.bytes_received,
                                            total=report.total_bytes_read,
                                            expected=unique_bytes(ref))
    return out


@pytest.mark.parametrize("nodes", [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1], [0, 1, 0, 1]])
def test_replicated_load_through_node_images_is_exact_and_reads_each_byte_once(checkpoints,
                                                                                 nodes):
    before = _images_left()
    results = run_ranks(_load_on_nodes, len(nodes), checkpoints, nodes, timeout=DEADLINE)
    for key in results[0]:
        per_rank = [r[key] for r in results]
        assert sum(r["read"] for r in per_rank) == per_rank[0]["total"] == per_rank[0]["expected"]
        for r in per_rank:
            assert r["received"] == r["total"] - r["read"], (key, per_rank)
    assert _images_left() <= before, "a node image was left in shared memory"


def _capture_warnings() -> list:
    """The records the ``distshard`` logger emits from now on, in this rank's process."""
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("distshard").addHandler(handler)
    return records


def _apart(rank: int, world_size: int, path: str, shm_root: str, shared_memory) -> object:
    # Every rank claims the same node, but rank 1 looks in another directory: as if a launcher
    # gave two machines one node name.
    os.environ["DISTSHARD_NODE"] = "same"
    distshard.shm.SHM_DIR = os.path.join(shm_root, str(rank == 1))
    os.makedirs(distshard.shm.SHM_DIR, exist_ok=True)
    model = empty_model("llama")
    warnings = _capture_warnings()
    try:
        distshard.load(model, path, bucket_size=SMALL_BUCKET, shared_memory=shared_memory)
    except distshard.DistShardError as e:
        assert all(p.is_meta for p in model.parameters())
        return str(e)
    assert_same(model, reference("llama", path), f"rank {rank}")
    return [w.getMessage() for w in warnings]


def test_ranks_that_do_not_share_an_image_fall_back_or_fail_as_asked(checkpoints, tmp_path):
    results = run_ranks(_apart, 3, checkpoints["llama"], str(tmp_path), None, timeout=DEADLINE)
    assert any("does not share" in w and "DISTSHARD_NODE" in w for r in results for w in r)
    results = run_ranks(_apart, 3, checkpoints["llama"], str(tmp_path), True, timeout=DEADLINE)
    assert len(set(results)) == 1 and "shared_memory=True" in results[0], results
    assert not glob.glob(str(tmp_path / "*" / "distshard-*")), "an image was left behind"


def _wide_model():
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])  # 33.6 MB


def _write_after_load(rank: int, world_size: int, path: str) -> dict:
    import psutil
    import torch

    with torch.device("meta"):
        model = _wide_model()
    before = psutil.Process().memory_info()
    distshard.load(model, path, shared_memory=True)
    sum(float(p.sum()) for p in model.parameters())  # touch every byte: still shared
    touched = psutil.Process().memory_info()
    weight = model[0].weight
    first = weight.detach().clone()
    torch.distributed.barrier()
    if rank == 0:
        with torch.no_grad():
            weight.add_(1.0)  # a write: this rank's own copy of the pages it touches
    torch.distributed.barrier()
    expected = first + 1.0 if rank == 0 else first
    reference = _wide_model()
    reference.load_state_dict(safetensors.torch.load_file(os.path.join(path, "model.safetensors")))
    return dict(kept=bool(torch.equal(weight, expected)),
                equal=all(torch.equal(a, b) for a, b in zip(model[1:].parameters(),
                                                            reference[1:].parameters())),
                private_growth=(touched.rss - touched.shared) - (before.rss - before.shared),
                shared_growth=touched.shared - before.shared,
                nbytes=sum(p.numel() * p.element_size() for p in model.parameters()))


def test_replicas_share_the_node_image_until_a_rank_writes(tmp_path):
    import torch

    torch.manual_seed(0)
    safetensors.torch.save_file(_wide_model().state_dict(), str(tmp_path / "model.safetensors"))
    results = run_ranks(_write_after_load, 2, str(tmp_path), timeout=DEADLINE)
    assert all(r["kept"] and r["equal"] for r in results), results  # no write crossed ranks
    for r in results:
        # every tensor is a view of the node's image: loading and reading them left the
        # memory shared (a tenth of the model covers the interpreter's own growth)
        assert r["private_growth"] < r["nbytes"] / 10, results
        assert r["shared_growth"] >= r["nbytes"], results


def _load_converted(rank: int, world_size: int, path: str, nodes: list[int]) -> bool:
    import torch

    os.environ["DISTSHARD_NODE"] = str(nodes[rank])
    model = empty_model("llama")
    distshard.load(model, path, bucket_size=SMALL_BUCKET, dtype=torch.bfloat16, shared_memory=True)
    ref = reference("llama", path)
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in ref.state_dict().items()}
    got = model.state_dict()
    return sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def test_conversion_happens_in_the_image_before_crossing_nodes(checkpoints):
    # fp32 checkpoint, bf16 model: the reader converts into its node's image, and what crosses
    # nodes is the converted bytes; every rank still equals the single-process conversion
    assert all(run_ranks(_load_converted, 4, checkpoints["llama"], [0, 0, 1, 1],
                         timeout=DEADLINE))


def _node_local(rank: int, world_size: int, path: str, nodes: list[int]) -> dict:
    from test_load_sharded import check_sharded, shard_fsdp
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["DISTSHARD_NODE"] = str(nodes[rank])
    out = {}
    for mode in ("image", "backend", "fsdp2-own", "fsdp2-sent"):
        model = empty_model("llama")
        kwargs = dict(bucket_size=SMALL_BUCKET, locality="node")
        if mode.startswith("fsdp2"):
            model.tie_weights()
            shard_fsdp(model, init_device_mesh("cpu", (world_size,)))
            kwargs["read_own_slices"] = mode == "fsdp2-own"
            report = distshard.load(model, path, **kwargs)
            check_sharded(model, reference("llama", path), f"{mode} rank {rank}",
                          exact_output=True)
        else:
            report = distshard.load(model, path, shared_memory=mode == "image", **kwargs)
            assert_same(model, reference("llama", path), f"{mode} rank {rank}")
        out[mode] = dict(read=report.bytes_read_per_rank, total=report.total_bytes_read,
                         expected=unique_bytes(reference("llama", path)))
    return out


@pytest.mark.parametrize("nodes", [[0, 0, 1, 1], [0, 1, 1]])
def test_node_locality_reads_the_checkpoint_once_per_node_and_loads_the_same(checkpoints, nodes):
    results = run_ranks(_node_local, len(nodes), checkpoints["llama"], nodes, timeout=DEADLINE)
    for mode, r in results[0].items():
        per_node = [sum(n for n, node in zip(r["read"], nodes) if node == k)
                    for k in sorted(set(nodes))]
        if mode == "fsdp2-own":  # each rank reads only its own rows, wherever it is
            assert sum(per_node) == r["expected"], (mode, per_node)
        else:  # every node read the whole checkpoint itself
            assert per_node == [r["expected"]] * len(per_node), (mode, per_node)


def _small_shm(rank: int, world_size: int, path: str, shared_memory) -> object:
    import types

    # /dev/shm with 16 KB free (less than the model), as in a container with a small shm_size;
    # this rank's process is its own, so patching os here touches nothing else
    os.statvfs = lambda path: types.SimpleNamespace(f_bavail=4, f_frsize=4096)
    model = empty_model("llama")
    warnings = _capture_warnings()
    try:
        report = distshard.load(model, path, shared_memory=shared_memory)
    except distshard.DistShardError as e:
        assert all(p.is_meta for p in model.parameters())
        return str(e)
    assert_same(model, reference("llama", path), f"rank {rank}")
    return [w.getMessage() for w in warnings], report.peak_host_memory


def test_a_small_dev_shm_falls_back_to_the_backend_or_fails_as_asked(checkpoints):
    before = _images_left()
    results = run_ranks(_small_shm, 2, checkpoints["llama"], None, timeout=DEADLINE)
    for warnings, _ in results:
        assert any("MB free" in w and "through the backend" in w for w in warnings), warnings
    results = run_ranks(_small_shm, 2, checkpoints["llama"], True, timeout=DEADLINE)
    assert len(set(results)) == 1 and "shared_memory=True" in results[0], results
    assert "MB free" in results[0]
    assert _images_left() <= before
