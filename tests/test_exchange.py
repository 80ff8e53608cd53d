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
from checkpoints import CASES, assert_same, empty_model, reference
from test_load_dist import DEADLINE, SMALL_BUCKET, unique_bytes

import distshard
import distshard.shm
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess


def _windows_left() -> set[str]:
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
def test_replicated_load_through_node_windows_is_exact_and_reads_each_byte_once(checkpoints,
                                                                                 nodes):
    before = _windows_left()
    results = run_ranks(_load_on_nodes, len(nodes), checkpoints, nodes, timeout=DEADLINE)
    for key in results[0]:
        per_rank = [r[key] for r in results]
        assert sum(r["read"] for r in per_rank) == per_rank[0]["total"] == per_rank[0]["expected"]
        for r in per_rank:
            assert r["received"] == r["total"] - r["read"], (key, per_rank)
    assert _windows_left() <= before, "a shared-memory window was left behind"


def _apart(rank: int, world_size: int, path: str, shm_root: str, shared_memory) -> object:
    # Every rank claims the same node, but rank 1 looks in another directory: as if a launcher
    # gave two machines one node name.
    os.environ["DISTSHARD_NODE"] = "same"
    distshard.shm.SHM_DIR = os.path.join(shm_root, str(rank == 1))
    os.makedirs(distshard.shm.SHM_DIR, exist_ok=True)
    model = empty_model("llama")
    warnings = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logging.getLogger("distshard").addHandler(handler)
    try:
        distshard.load(model, path, bucket_size=SMALL_BUCKET, shared_memory=shared_memory)
    except distshard.DistShardError as e:
        assert all(p.is_meta for p in model.parameters())
        return str(e)
    assert_same(model, reference("llama", path), f"rank {rank}")
    return [w.getMessage() for w in warnings]


def test_ranks_that_do_not_share_a_window_fall_back_or_fail_as_asked(checkpoints, tmp_path):
    results = run_ranks(_apart, 3, checkpoints["llama"], str(tmp_path), None, timeout=DEADLINE)
    assert any("does not share" in w and "DISTSHARD_NODE" in w for r in results for w in r)
    results = run_ranks(_apart, 3, checkpoints["llama"], str(tmp_path), True, timeout=DEADLINE)
    assert len(set(results)) == 1 and "shared_memory=True" in results[0], results
    assert not glob.glob(str(tmp_path / "*" / "distshard-*")), "a window was left behind"
