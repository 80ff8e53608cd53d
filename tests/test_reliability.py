"""Bad checkpoints and rank faults: every rank raises the same clear DistShardError in time,
and no model is left changed; valid edge cases load exactly. Each case runs on 1 and 3 ranks."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
from corpus import CASES, SpecModel, make_state, run_case, write_corpus

import distshard
from distshard import DistShardError, _faults
from distshard.testing import RanksFailed, run_ranks

DEADLINE = 300


def check_outcome(name: str, outcome: dict, rank: int) -> None:
    case = CASES[name]
    if case.error is None:
        assert outcome["error"] is None, f"{name}: {outcome['error']}"
        assert outcome["exact"], f"{name}: loaded values differ (silent corruption)"
        return
    msg = outcome["error"]
    assert msg is not None, f"{name}: loaded without an error"
    assert re.search(case.error, msg), f"{name}: {msg}"
    assert re.search(r"\[rank \d+, ", msg), f"{name}: no rank named in {msg}"
    if case.file:
        named = case.file in msg or repr(case.file) in msg
        assert named, f"{name}: file {case.file!r} not named in {msg}"
    if case.key:
        assert repr(case.key) in msg or case.key in msg, f"{name}: key {case.key} not named in {msg}"
    assert outcome["unchanged"], f"{name}: the model was changed by a failed load"
    assert not outcome["code_ran"], f"{name}: code in a pickle ran"


def _corpus_on_ranks(rank: int, world_size: int, root: str) -> dict:
    return {name: run_case(name, root, rank) for name in CASES}


@pytest.fixture(scope="module")
def corpus_roots(tmp_path_factory):
    """Two copies: some cases change their files while loading."""
    return [write_corpus(tmp_path_factory.mktemp(f"corpus{i}")) for i in range(2)]


def test_corpus_has_enough_cases():
    assert sum(c.error is not None for c in CASES.values()) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_corpus_case_on_one_rank(corpus_roots, name):
    check_outcome(name, run_case(name, corpus_roots[0], 0), 0)


@pytest.mark.multiprocess
def test_corpus_on_three_ranks(corpus_roots):
    results = run_ranks(_corpus_on_ranks, 3, corpus_roots[1], timeout=DEADLINE)
    for name in CASES:
        for rank, r in enumerate(results):
            check_outcome(name, r[name], rank)
        assert len({r[name]["error"] for r in results}) == 1, f"{name}: ranks disagree"


# Many buckets on each reader: the readers of a rank hold as-read buckets that wait to be sent.
WIDE_SPEC = {f"layer{i}.weight": ((64, 64), torch.float16) for i in range(24)}


def _die_or_stall(rank: int, world_size: int, path: str, fault: tuple, nodes: str | None) -> dict:
    import threading

    import torch.distributed as dist
    from corpus import SPEC

    spec = SPEC
    if nodes:  # one node per rank: fp16 buckets cross nodes as read, into fp64 parameters, or
        # in the image, into pages that each receiver allocates ahead on a thread of its own
        os.environ["DISTSHARD_NODE"] = str(rank)
        spec = WIDE_SPEC
    if nodes == "image":  # each range slow to allocate: the thread is alive when rank 1 dies
        from distshard.shm import NodeImage

        allocate = NodeImage.prefault

        def slowly(image, begin, end):
            time.sleep(0.5)
            return allocate(image, begin, end)
        NodeImage.prefault = slowly
    # Every rank connected before one dies: a rank killed while a peer is still inside
    # init_process_group fails that peer there, in gloo, before distshard is called.
    dist.barrier()
    _faults.FAULT, _faults.STALL_SECONDS = fault, 8.0
    model = SpecModel(spec)
    started = time.monotonic()
    try:
        distshard.load(model, path, timeout=3, log_summary=False, bucket_size=4096,
                       dtype=torch.float64 if nodes == "as read" else None)
        return dict(error=None)
    except DistShardError as e:
        files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}")]
        return dict(error=str(e), seconds=time.monotonic() - started,
                    unchanged=all(p.is_meta for p in model.parameters()),
                    threads=[t.name for t in threading.enumerate()
                             if t.name.startswith("distshard")],
                    files=[f for f in files if f.startswith(path) or "distshard" in f])


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault, nodes", [
    (("read", 1, "kill"), None), (("validate", 2, "kill"), None),
    (("distribute", 2, "stall"), None), (("plan", 0, "stall"), None),
    (("read", 1, "kill"), "as read"), (("read", 1, "kill"), "image")])
def test_a_killed_or_stalled_rank_stops_the_others_within_the_timeout(tmp_path, fault, nodes):
    from corpus import write_sharded

    write_sharded(tmp_path, make_state(WIDE_SPEC if nodes else None), files=3)
    phase, bad, action = fault
    try:
        results = dict(enumerate(run_ranks(_die_or_stall, 3, str(tmp_path), fault, nodes,
                                           timeout=120)))
    except RanksFailed as e:  # the killed rank leaves no result
        assert action == "kill" and set(e.errors) == {bad}, e
        results = e.results
    others = {r: v for r, v in results.items() if r != bad}
    assert len(others) == 2
    for r, v in others.items():
        assert v["error"] is not None, f"rank {r} loaded although rank {bad} failed"
        assert v["unchanged"], f"rank {r}: model changed"
        assert v["seconds"] < 3 + 15, f"rank {r} took {v['seconds']:.1f} s to fail"
        assert not v["threads"] and not v["files"], f"rank {r} left {v['threads']} {v['files']}"
