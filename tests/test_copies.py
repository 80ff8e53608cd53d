"""One file on every node: each node's own copy of the checkpoint is identified with rank 0's by
size and metadata digest, not by modification time (see distshard.copies).

The job test is the S2 set-up: two torchrun agents ("nodes"), each in its own mount namespace
where its own copy of the checkpoint is bound at one common path, copies made at different
times. It needs ``unshare -m`` (root); without it, it is skipped and the unit tests beside it
still check the rules."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from distshard.copies import digests, local_plan, metadata_digest
from distshard.errors import DistShardError
from distshard.plan import LoadPlan, PlannedFile
from distshard.topology import Topology

DEADLINE = 120
TWO_NODES = Topology.from_keys([11, 22])  # rank 0 on one node, rank 1 on another


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(64, 32, generator=g) for i in range(3)}


def _write(folder, state, metadata=None) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata=metadata)
    return str(folder)


def _plan_of(folder) -> LoadPlan:
    st = os.stat(os.path.join(folder, "model.safetensors"))
    f = PlannedFile("model.safetensors", "safetensors", st.st_size, st.st_mtime_ns)
    return LoadPlan(world_size=2, bucket_size=1 << 20, files=(f,), buckets=())


def _later_copy(src, dst) -> str:
    """A copy that keeps the bytes and not the times (``cp`` without ``-p``), made later."""
    os.makedirs(dst, exist_ok=True)
    shutil.copyfile(os.path.join(src, "model.safetensors"), os.path.join(dst, "model.safetensors"))
    later = time.time() + 3600
    os.utime(os.path.join(dst, "model.safetensors"), (later, later))
    return str(dst)


def _other_dtype(folder) -> None:
    """The same size and data, another dtype named for one tensor: another export."""
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    patched = raw.replace(b'"F32"', b'"I32"', 1)
    assert len(patched) == len(raw) and patched != raw
    with open(path, "wb") as f:
        f.write(patched)


def test_a_copy_with_other_times_is_the_same_file_and_keeps_its_own_times(tmp_path):
    a = _write(tmp_path / "a", _state())
    b = _later_copy(a, tmp_path / "b")
    plan = _plan_of(a)
    planned = digests(a, plan, TWO_NODES)
    assert local_plan(b, plan, planned, TWO_NODES, 0) is plan  # rank 0's node: as planned
    mine = local_plan(b, plan, planned, TWO_NODES, 1)
    st = os.stat(os.path.join(b, "model.safetensors"))
    assert (mine.files[0].size, mine.files[0].mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert mine.files[0].mtime_ns != plan.files[0].mtime_ns
    assert digests(a, plan, Topology.from_keys([1, 1])) is None  # one node: nothing to compare


@pytest.mark.parametrize("change", ["header", "size", "missing"])
def test_a_copy_that_really_differs_is_refused_naming_file_nodes_and_difference(tmp_path,
                                                                               change):
    a = _write(tmp_path / "a", _state())
    plan = _plan_of(a)
    planned = digests(a, plan, TWO_NODES)
    b = tmp_path / "b"
    if change == "header":
        _other_dtype(_later_copy(a, b))
        want = "other safetensors header"
    elif change == "size":
        _write(b, {**_state(), "extra": torch.zeros(3)})
        want = "bytes on the first"
    else:
        os.makedirs(b)
        want = "is missing on node"
    with pytest.raises(DistShardError) as e:
        local_plan(str(b), plan, planned, TWO_NODES, 1)
    message = str(e.value)
    assert want in message and "'model.safetensors'" in message and "rank 1" in message
    assert "distshard verify --hash" in message
    assert e.value.file == "model.safetensors"


def test_the_digest_reads_the_header_not_the_data(tmp_path):
    a = _write(tmp_path / "a", _state(0))
    b = _write(tmp_path / "b", _state(1))  # same names, dtypes, shapes: other values
    c = _write(tmp_path / "c", _state(0), metadata={"format": "pt"})
    pa, pb, pc = (os.path.join(x, "model.safetensors") for x in (a, b, c))
    assert metadata_digest(pa, "safetensors") == metadata_digest(pb, "safetensors")
    assert metadata_digest(pa, "safetensors") != metadata_digest(pc, "safetensors")


# --- the S2 set-up: a job of two nodes, each with its own copy -----------------------------

_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from safetensors.torch import load_file
    import distshard

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(32, 64, bias=False, device="meta") for _ in range(3))

    mount, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for name in ("same", "differs"):
        model = Model()
        try:
            distshard.load(model, os.path.join(mount, name), log_summary=False)
            want = load_file(os.path.join(mount, name, "model.safetensors"))
            result[name] = all(torch.equal(v, model.state_dict()[k]) for k, v in want.items())
        except distshard.DistShardError as e:
            result[name] = "error: " + str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
""")


def _unshare_unavailable() -> str | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "needs unshare(1) and mount(8)"
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        return "unshare -m is not permitted here (needs root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.skipif(_unshare_unavailable() is not None, reason=str(_unshare_unavailable()))
def test_two_nodes_with_copies_made_at_different_times_load_and_differing_copies_fail(tmp_path):
    node0 = tmp_path / "node0"
    _write(node0 / "same", _state(0))
    _write(node0 / "differs", _state(0))
    node1 = tmp_path / "node1"
    _later_copy(node0 / "same", node1 / "same")
    _other_dtype(_later_copy(node0 / "differs", node1 / "differs"))
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    script = tmp_path / "job.py"
    script.write_text(_WORKER)
    port = _free_port()
    agents = []
    for node, copy in enumerate((node0, node1)):
        torchrun = (f"{sys.executable} -m torch.distributed.run --nnodes=2 --nproc-per-node=1 "
                    f"--node-rank={node} --master-addr=127.0.0.1 --master-port={port} "
                    f"{script} {mount} {out}")
        env = {k: v for k, v in os.environ.items() if k != "DISTSHARD_NODE"}
        agents.append(subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f"mount --bind {copy} {mount} && exec {torchrun}"],
            env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True))
    deadline = time.monotonic() + DEADLINE
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, 9)
                agent.wait()
    # (an agent may exit non-zero after its rank finished, when the other agent's rendezvous
    # store closes first: the ranks' own results are what counts)
    assert all((out / f"rank{r}.json").exists() for r in (0, 1)), "\n".join(
        log[-3000:] for log in logs)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["same"] for r in results] == [True, True]
    for r in results:  # the same error on every rank, naming the file, both nodes, the cause
        message = r["differs"]
        assert message.startswith("error: ") and message == results[0]["differs"]
        assert "'model.safetensors'" in message and "other safetensors header" in message
        assert "group-rank:1" in message and "group-rank:0" in message


def test_local_plan_replaces_only_the_stats(tmp_path):
    a = _write(tmp_path / "a", _state())
    b = _later_copy(a, tmp_path / "b")
    plan = _plan_of(a)
    mine = local_plan(b, plan, digests(a, plan, TWO_NODES), TWO_NODES, 1)
    assert dataclasses.replace(mine.files[0], mtime_ns=plan.files[0].mtime_ns) == plan.files[0]
