"""Multi-process gloo tests: every format on 1-4 ranks, sub-groups, and injected faults.

Each test spawns one group of ranks and runs many checks inside it (spawning costs seconds).
Rank bodies are module-level functions so that spawned processes can import them.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
from checkpoints import CASES, assert_same, empty_model, reference

import distshard
from distshard import _faults
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess
DEADLINE = 300  # seconds for a whole spawned group; a hang fails the test at this point
SMALL_BUCKET = 8192  # forces many buckets, several tensors per bucket and tensors larger than one


def unique_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors a checkpoint must supply (tied weights count once)."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                tensors[id(b)] = b
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _load_every_case(rank: int, world_size: int, paths: dict[str, str]) -> dict:
    out = {}
    for name, path in paths.items():
        family = CASES[name][0]
        model = empty_model(family)
        report = distshard.load(model, path, bucket_size=SMALL_BUCKET)
        ref = reference(name, path)
        assert_same(model, ref, f"{name} on rank {rank}/{world_size}")
        if family == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.weight, "tied weights untied"
        assert report.rank == rank and report.world_size == world_size
        assert not report.missing_keys and not report.unexpected_keys
        out[name] = dict(bytes_read=report.bytes_read, total=report.total_bytes_read,
                         received=report.bytes_received,
                         per_rank=report.bytes_read_per_rank, files=report.files_read,
                         expected=unique_bytes(ref))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_format_loads_bitwise_on_every_rank(checkpoints, world_size):
    results = run_ranks(_load_every_case, world_size, checkpoints, timeout=DEADLINE)
    for name in checkpoints:
        per_rank = [r[name] for r in results]
        assert [r["bytes_read"] for r in per_rank] == per_rank[0]["per_rank"]
        assert per_rank[0]["total"] == per_rank[0]["expected"], f"{name}: read {per_rank[0]}"
        if world_size > 1:  # ranges, not files: even a single file is shared by the ranks
            assert sum(r["bytes_read"] > 0 for r in per_rank) > 1, f"{name}: {per_rank[0]}"
        for r in per_rank:  # replicated: everything a rank did not read reaches it by broadcast
            assert r["received"] == r["total"] - r["bytes_read"]


def _subgroup(rank: int, world_size: int, path: str):
    members = [1, 3]
    group = dist.new_group(members)  # every rank takes part in creating it
    result = None
    if rank in members:
        model = empty_model("gpt2")
        report = distshard.load(model, path, group=group, bucket_size=SMALL_BUCKET)
        assert_same(model, reference("gpt2", path), f"sub-group rank {rank}")
        result = (report.rank, report.world_size, report.bytes_read)
    dist.barrier()
    return result


def test_sub_group_of_two_in_four_loads_while_others_do_not_call(checkpoints):
    results = run_ranks(_subgroup, 4, checkpoints["gpt2"], timeout=DEADLINE)
    assert results[0] is None and results[2] is None
    assert [r[:2] for r in (results[1], results[3])] == [(0, 2), (1, 2)]
    assert results[1][2] > 0 and results[3][2] > 0  # the two members shared the reading


def _open_files() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def _inject_faults(rank: int, world_size: int, path: str, bad_ranks: list[int]) -> list:
    distshard.load(empty_model("llama"), path, bucket_size=SMALL_BUCKET)  # warm: lazy opens
    files_before = _open_files()
    seen = []
    for phase in _faults.PHASES:
        for bad in bad_ranks:
            model = empty_model("llama")
            before = {k: v.clone() for k, v in model.named_buffers()}
            _faults.FAULT = (phase, bad)
            started = time.monotonic()
            try:
                distshard.load(model, path, bucket_size=SMALL_BUCKET)
            except distshard.DistShardError as e:
                message = str(e)
            else:
                raise AssertionError(f"no error for a fault in {phase} on rank {bad}")
            finally:
                _faults.FAULT = None
            assert f"rank {bad}, {phase}" in message, message
            assert f"injected fault in phase '{phase}' on rank {bad}" in message, message
            assert all(p.is_meta for p in model.parameters()), "parameters changed after an error"
            assert all(torch.equal(before[k], v) for k, v in model.named_buffers())
            seen.append((phase, bad, message, time.monotonic() - started))
    # Nothing was left behind: no open file (checkpoint, node image), no thread of distshard.
    assert _open_files() <= files_before, _open_files() - files_before
    assert not [t.name for t in threading.enumerate() if t.name.startswith("distshard")]
    # The group is still usable: a clean load after all those failures is exact.
    model = empty_model("llama")
    distshard.load(model, path, bucket_size=SMALL_BUCKET)
    assert_same(model, reference("llama-bin", path), "after faults")
    return seen


@pytest.mark.parametrize("world_size,bad_ranks", [(2, [0, 1]), (3, [0, 2])])
def test_fault_in_any_phase_on_any_rank_raises_the_same_error_everywhere(checkpoints, world_size,
                                                                          bad_ranks):
    results = run_ranks(_inject_faults, world_size, checkpoints["llama-bin"], bad_ranks,
                        timeout=DEADLINE)
    assert len(results[0]) == len(_faults.PHASES) * len(bad_ranks)
    for case in range(len(results[0])):
        messages = {r[case][2] for r in results}
        assert len(messages) == 1, f"ranks raised different errors: {messages}"
