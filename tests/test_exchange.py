"""The shared copy of a node's ranks (the checkpoint files' page cache, or an image in
``/dev/shm``), and several nodes simulated on one machine.

Nodes are told apart with ``DISTSHARD_NODE`` (set by each rank before it loads); the ranks of
different "nodes" then pass buckets point to point over gloo and share nothing through
``/dev/shm``, as on separate machines.
"""

from __future__ import annotations

import glob
import io
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


# How a replicated load may share each node's copy: load() arguments, and the copy it must
# report. Mapping the checkpoint files needs a node that reads every byte itself.
MODES = {"files": dict(map_checkpoint=True), "shm": dict(map_checkpoint=False, shared_memory=True),
         "backend": dict(shared_memory=False)}


def _load_on_nodes(rank: int, world_size: int, paths: dict[str, str], nodes: list[int]) -> dict:
    os.environ["DISTSHARD_NODE"] = str(nodes[rank])
    out = {}
    for mode, kwargs in MODES.items():
        for name, path in paths.items():
            model = empty_model(CASES[name][0])
            report = distshard.load(model, path, bucket_size=SMALL_BUCKET, **kwargs)
            ref = reference(name, path)
            assert_same(model, ref, f"{name} on rank {rank}, nodes {nodes}, {mode}")
            out[name, mode] = dict(read=report.bytes_read, received=report.bytes_received,
                                   total=report.total_bytes_read, expected=unique_bytes(ref),
                                   shared_copy=report.shared_copy)
    return out


@pytest.mark.parametrize("nodes", [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1], [0, 1, 0, 1]])
def test_replicated_load_through_node_images_is_exact_and_reads_each_byte_once(checkpoints,
                                                                                 nodes):
    before = _images_left()
    results = run_ranks(_load_on_nodes, len(nodes), checkpoints, nodes, timeout=DEADLINE)
    # the .bin case cannot be mapped; one node of several cannot map what others read
    for (name, mode), r in results[0].items():
        files = CASES[name][1].endswith("safetensors") and len(set(nodes)) == 1
        want = {"files": "files" if files else "shm", "shm": "shm", "backend": None}[mode]
        assert r["shared_copy"] == want, (name, mode, r)
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
        distshard.load(model, path, bucket_size=SMALL_BUCKET, shared_memory=shared_memory,
                       map_checkpoint=False)
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


def _write_after_load(rank: int, world_size: int, path: str, map_checkpoint: bool) -> dict:
    import psutil
    import torch

    with torch.device("meta"):
        model = _wide_model()
    before = psutil.Process().memory_info()
    report = distshard.load(model, path, shared_memory=True, map_checkpoint=map_checkpoint)
    sum(float(p.sum()) for p in model.parameters())  # touch every byte: still shared
    touched = psutil.Process().memory_info()
    weight = model[0].weight
    first = weight.detach().clone()
    saved = io.BytesIO()
    torch.save(model[0].bias, saved)  # writes the bias's storage whole
    own = [p.untyped_storage().nbytes() == p.nbytes for p in model.parameters()]
    out = model[0](torch.ones(2, 1024, requires_grad=True)).sum()
    with torch.no_grad():
        model[1].bias.mul_(1.0)  # an in-place write to another tensor of the same file
    out.backward()  # each tensor counts its own writes: model[0]'s saved weight is unchanged
    model.zero_grad(set_to_none=True)
    torch.distributed.barrier()
    if rank == 0:
        with torch.no_grad():
            weight.add_(1.0)  # a write: this rank's own copy of the pages it touches
    torch.distributed.barrier()
    expected = first + 1.0 if rank == 0 else first
    reference = _wide_model()
    reference.load_state_dict(safetensors.torch.load_file(os.path.join(path, "model.safetensors")))
    return dict(kept=bool(torch.equal(weight, expected)),
                file_kept=bool(torch.equal(reference[0].weight, first)),
                equal=all(torch.equal(a, b) for a, b in zip(model[1:].parameters(),
                                                            reference[1:].parameters())),
                private_growth=(touched.rss - touched.shared) - (before.rss - before.shared),
                shared_growth=touched.shared - before.shared, shared_copy=report.shared_copy,
                nbytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                own_storage=all(own), saved=saved.tell(), bias_bytes=model[0].bias.nbytes)


@pytest.mark.parametrize("map_checkpoint", [True, False], ids=["files", "shm"])
def test_replicas_share_the_node_copy_until_a_rank_writes(tmp_path, map_checkpoint):
    """Both shared copies (the page cache, the node image) stay shared until a rank writes, and
    each tensor is a tensor of its own on a storage of its own (a slice of the node's copy):
    ``torch.save`` of one tensor, or a splitter that groups tensors by storage, sees its bytes,
    not the whole mapping; and autograd, which checks a saved tensor's count of writes, does
    not see a write to another tensor of the same file (views of one buffer share one count)."""
    import torch

    torch.manual_seed(0)
    safetensors.torch.save_file(_wide_model().state_dict(), str(tmp_path / "model.safetensors"))
    results = run_ranks(_write_after_load, 2, str(tmp_path), map_checkpoint, timeout=DEADLINE)
    # no write crossed ranks, nor reached the checkpoint file
    assert all(r["kept"] and r["file_kept"] and r["equal"] for r in results), results
    for r in results:
        assert r["shared_copy"] == ("files" if map_checkpoint else "shm"), results
        # every tensor is a view of the node's copy: loading and reading them left the
        # memory shared (a tenth of the model covers the interpreter's own growth)
        assert r["private_growth"] < r["nbytes"] / 10, results
        assert r["shared_growth"] >= r["nbytes"], results
        assert r["own_storage"], results
        assert r["saved"] < r["bias_bytes"] + 4096, results  # the bias, not the 33.6 MB file


def _load_converted(rank: int, world_size: int, path: str, nodes: list[int]) -> bool:
    import torch

    os.environ["DISTSHARD_NODE"] = str(nodes[rank])
    model = empty_model("llama")
    report = distshard.load(model, path, bucket_size=SMALL_BUCKET, dtype=torch.bfloat16,
                            shared_memory=True)
    assert report.shared_copy == "shm"  # a converted tensor is not the file's bytes
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
    for mode in ("files", "shm", "backend", "fsdp2-own", "fsdp2-sent"):
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
            report = distshard.load(model, path, **MODES[mode], **kwargs)
            assert_same(model, reference("llama", path), f"{mode} rank {rank}")
            assert report.shared_copy == {"backend": None}.get(mode, mode)
        out[mode] = dict(read=report.bytes_read_per_rank, total=report.total_bytes_read,
                         expected=unique_bytes(reference("llama", path)))
    return out


@pytest.mark.parametrize("nodes", [[0, 0, 1, 1], [0, 1, 1], [0, 1]])
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
        report = distshard.load(model, path, shared_memory=shared_memory, map_checkpoint=False)
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


def _misaligned_checkpoint(folder) -> dict:
    """A safetensors file (written by hand; the format allows it) whose float32 tensor starts
    6 bytes into the data, after a 3-element bfloat16 one: no float32 view can start there."""
    import json
    import struct

    import torch

    torch.manual_seed(0)
    state = {"a": torch.randn(3).to(torch.bfloat16), "b": torch.randn(2, 2)}
    header = {"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
              "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.write(b"".join(state[k].view(torch.uint8).numpy().tobytes() for k in ("a", "b")))
    return state


class _Pair:
    def __new__(cls):
        import torch

        module = torch.nn.Module()
        module.a = torch.nn.Parameter(torch.empty(3, dtype=torch.bfloat16, device="meta"))
        module.b = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
        return module


def _load_misaligned(rank: int, world_size: int, path: str) -> str | None:
    import torch

    model = _Pair()
    report = distshard.load(model, path)
    want = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
    assert all(torch.equal(getattr(model, k), v) and getattr(model, k).dtype == v.dtype
               for k, v in want.items())
    return report.shared_copy


def test_a_tensor_the_file_holds_misaligned_is_shared_through_dev_shm(tmp_path):
    _misaligned_checkpoint(tmp_path)
    assert run_ranks(_load_misaligned, 2, str(tmp_path), timeout=DEADLINE) == ["shm", "shm"]


def _narrowed(rank: int, world_size: int, path: str) -> dict:
    import torch
    from test_load_sharded import shard_fsdp, shard_tp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    ref = reference("llama", path).to(torch.bfloat16)  # the single-process conversion
    want = dict(ref.named_parameters(remove_duplicate=False))
    out = {}
    for mode in ("backend", "fsdp2-sent", "tp-sent"):
        for dtype in (None, torch.bfloat16):
            model = empty_model("llama")
            if mode != "backend":
                model.tie_weights()
                mesh = init_device_mesh("cpu", (world_size,))
                (shard_fsdp if mode == "fsdp2-sent" else shard_tp)(model, mesh)
            report = distshard.load(model, path, bucket_size=SMALL_BUCKET, dtype=dtype,
                                    shared_memory=False, read_own_slices=False)
            out[mode, str(dtype)] = report.bytes_received
        for name, p in model.named_parameters(remove_duplicate=False):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            assert full.dtype == torch.bfloat16 and torch.equal(full, want[name]), (mode, name)
    return out


def test_a_narrowing_dtype_is_converted_by_the_reader_before_it_is_sent(checkpoints):
    # fp32 checkpoint, bf16 model: the reader converts, and what crosses ranks is bf16, half
    # the bytes of a load in the file's dtype (the backend's broadcast, and the pieces sent to
    # FSDP2 and tensor-parallel shards); every rank equals the single-process conversion
    results = run_ranks(_narrowed, 2, checkpoints["llama"], timeout=DEADLINE)
    for r in results:
        for mode in ("backend", "fsdp2-sent", "tp-sent"):
            ratio = r[mode, "torch.bfloat16"] / r[mode, "None"]
            assert 0.45 < ratio < 0.55, (mode, r)


def _widened(rank: int, world_size: int, path: str, nodes: list[int]) -> dict:
    import torch

    import distshard.comm

    os.environ["DISTSHARD_NODE"] = str(nodes[rank])
    sent = []
    exchange = distshard.comm.Comm.exchange

    def counting(self, sends, recvs):
        sent.append(sum(t.numel() * t.element_size() for t, _ in sends))
        return exchange(self, sends, recvs)

    distshard.comm.Comm.exchange = counting
    out = {}
    for dtype in (torch.bfloat16, torch.float32):  # as in the file; widened by the load
        model = empty_model("llama")
        sent.clear()
        distshard.load(model, path, bucket_size=SMALL_BUCKET, dtype=dtype, shared_memory=True,
                       map_checkpoint=False)
        want = {k: v.to(dtype) if v.is_floating_point() else v
                for k, v in safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
                .items()}
        got = model.state_dict()
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (dtype, k)
        out[str(dtype)] = sum(sent)
    return out


def test_a_widening_dtype_crosses_nodes_as_read_and_is_converted_by_the_receivers(tmp_path):
    # bf16 checkpoint, fp32 model: what crosses nodes is bf16 (as in the file), the same bytes as
    # a bf16 load, not the doubled fp32; each node converts into its image; bitwise everywhere
    import torch

    torch.manual_seed(0)
    model = empty_model("llama")
    state = {k: torch.randn(v.shape).to(torch.bfloat16) if v.is_floating_point()
             else torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    results = run_ranks(_widened, 4, str(tmp_path), [0, 0, 1, 1], timeout=DEADLINE)
    total = [sum(r[k] for r in results) for k in ("torch.bfloat16", "torch.float32")]
    assert total[0] > 0 and total[1] == total[0], results


def _overlapped(rank: int, world_size: int, path: str) -> dict:
    import threading
    import time

    import distshard.comm
    import distshard.reader

    events, lock = [], threading.Lock()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    events.append((name, began, time.perf_counter()))
        return wrapper

    broadcast = distshard.comm.Comm.broadcast

    def slow_broadcast(self, tensor, src):
        time.sleep(0.05)  # a slow wire: the next read has time to start meanwhile
        return broadcast(self, tensor, src)

    read = distshard.reader.ShardReader.read

    def slow_read(self, bucket, buf):
        time.sleep(0.02)  # a slow disk
        return read(self, bucket, buf)

    distshard.comm.Comm.broadcast = timed("send", slow_broadcast)
    distshard.reader.ShardReader.read = timed("read", slow_read)
    model = empty_model("llama")
    report = distshard.load(model, path, bucket_size=SMALL_BUCKET, shared_memory=False)
    assert_same(model, reference("llama", path), f"rank {rank}")
    sends = [(b, e) for name, b, e in events if name == "send"]
    reads = [(b, e) for name, b, e in events if name == "read"]
    # reads of this rank's buckets that ran while a collective was under way
    during = sum(any(sb < re and rb < se for sb, se in sends) for rb, re in reads)
    return dict(reads=len(reads), during=during, read=report.bytes_read)


def test_the_next_bucket_is_read_while_the_current_one_is_sent(checkpoints):
    # (read on the main thread, between collectives, no read could ever overlap one)
    results = run_ranks(_overlapped, 2, checkpoints["llama"], timeout=DEADLINE)
    for r in results:
        assert r["reads"] > 2 and r["read"] > 0, results
        assert r["during"] >= r["reads"] // 3, results
