"""The plan is pure: unit tests and a property test, no processes, no files."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distshard.routes.image_layout import ImageLayout
from distshard.index import FileInfo, TensorInfo
from distshard.keymap import Conversion, leaf, stack, volume
from distshard.plan import ALIGN, assign_ranges, make_plan


def file_of(name: str, sizes: list[int], kind: str = "safetensors") -> FileInfo:
    tensors, begin = {}, 8
    for i, n in enumerate(sizes):
        tensors[f"{name}.t{i}"] = TensorInfo(torch.uint8, (n,), begin if kind == "safetensors" else None)
        begin += n
    return FileInfo(name=name, kind=kind, size=begin, mtime_ns=0, tensors=tensors)


def test_ranges_are_contiguous_stretches_of_equal_bytes():
    assert assign_ranges([10, 7, 5, 4, 6, 8], 2) == [0, 0, 0, 1, 1, 1]
    assert assign_ranges([1] * 9, 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_single_file_is_shared_by_every_rank():
    plan = make_plan([file_of("f", [100] * 8)], world_size=4, bucket_size=200)
    assert plan.bytes_per_rank() == [200, 200, 200, 200]


def test_more_ranks_than_buckets_leaves_some_ranks_without_reads():
    plan = make_plan([file_of("f", [100, 100])], world_size=4, bucket_size=1 << 20)
    assert sorted(plan.bytes_per_rank()) == [0, 0, 0, 200]
    assert len({b.owner for b in plan.buckets}) == 1


def test_buckets_respect_the_size_and_keep_file_order():
    plan = make_plan([file_of("f", [30, 30, 30, 100, 5])], world_size=1, bucket_size=64)
    assert [[s.key for s in b.slots] for b in plan.buckets] == [
        ["f.t0", "f.t1"], ["f.t2"], ["f.t3"], ["f.t3"], ["f.t4"]]
    assert all(b.nbytes <= 64 for b in plan.buckets)


def test_a_tensor_larger_than_a_bucket_is_cut_into_runs_of_whole_rows():
    f = FileInfo(name="f", kind="safetensors", size=0, mtime_ns=0,
                 tensors={"w": TensorInfo(torch.float32, (10, 3), 100)})  # 12-byte rows
    plan = make_plan([f], world_size=1, bucket_size=50)
    slots = [b.slots[0] for b in plan.buckets]
    assert [(s.extent[0][0], s.shape, s.begin, s.nbytes) for s in slots] == [
        (0, (4, 3), 100, 48), (4, (4, 3), 148, 48), (8, (2, 3), 196, 24)]


def test_slots_are_aligned_so_buckets_can_be_viewed_as_any_dtype():
    plan = make_plan([file_of("f", [3, 5, 7, 0, 9])], world_size=1, bucket_size=1 << 20)
    assert all(s.offset % ALIGN == 0 for b in plan.buckets for s in b.slots)


def test_buckets_of_different_owners_are_interleaved():
    files = [file_of("a", [10] * 3), file_of("b", [10] * 3)]
    plan = make_plan(files, world_size=2, bucket_size=10)
    assert [b.owner for b in plan.buckets] == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_bucket_size_is_refused(bad):
    with pytest.raises(ValueError, match="bucket_size"):
        make_plan([file_of("f", [1])], world_size=1, bucket_size=bad)


def test_world_size_below_one_is_refused():
    with pytest.raises(ValueError, match="world_size"):
        assign_ranges([1], 0)


def test_a_plan_pickles_to_an_equal_plan():
    """Rank 0 sends the plan pickled (as tuples, see LoadPlan.__reduce__): boxes of a fused
    tensor read from other keys, runs of a tensor larger than a bucket, a conversion bucket."""
    f = FileInfo(name="f", kind="safetensors", size=0, mtime_ns=0, tensors={
        **{f"e.{i}.w": TensorInfo(torch.float32, (4, 3), 8 + 48 * i) for i in range(3)},
        "big": TensorInfo(torch.float64, (8, 2), 152), "t": TensorInfo(torch.bfloat16, (6, 2), 280)})
    parts = {"big": list(leaf("big", (8, 2)).named("big"))}
    for p in stack([leaf(f"e.{i}.w", (4, 3)) for i in range(3)], 0).named("fused"):
        parts.setdefault(p.source, []).append(p)
    conversion = Conversion(("tt",), ("t",), "Transpose", ((2, 6),), op=("op", 1))
    plan = make_plan([f], 2, 64, parts=parts, conversions=[conversion],
                     outputs={"tt": ((2, 6), torch.bfloat16)})
    copy = pickle.loads(pickle.dumps(plan))
    assert copy == plan
    slots = [s for b in copy.buckets for s in b.slots]
    assert {s.key: s.source_key for s in slots} == {"fused": "e.2.w", "big": "big", "tt": "tt"}
    assert [s.at for s in slots if s.key == "big"] == [(0, 0), (4, 0)]  # two runs
    assert copy.buckets[-1].conversion.op == ("op", 1) and copy.buckets[-1].sources[0].key == "t"


layouts = st.lists(st.lists(st.integers(0, 5000), min_size=1, max_size=6), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(layout=layouts, world_size=st.integers(1, 9), bucket_size=st.integers(200, 8000),
       kind=st.sampled_from(["safetensors", "bin"]))
def test_every_tensor_is_owned_once_and_the_load_is_balanced(layout, world_size, bucket_size, kind):
    files = [file_of(f"file{i}", sizes, kind) for i, sizes in enumerate(layout)]
    plan = make_plan(files, world_size, bucket_size)
    rows: dict[str, list[tuple[int, int]]] = {}
    tape = sorted(plan.buckets, key=lambda b: (b.file, b.slots[0].begin or 0, b.slots[0].key,
                                               b.slots[0].first))
    assert [b.owner for b in tape] == sorted(b.owner for b in tape)  # one stretch per rank
    for b in plan.buckets:
        assert b.nbytes <= bucket_size or b.slots[0].shape[0] <= 1  # one row may exceed
        assert b.nbytes == b.slots[-1].offset + b.slots[-1].nbytes
        for s in b.slots:
            rows.setdefault(s.key, []).append((s.extent[0][0], s.shape[0]))
    for f in files:  # every row of every tensor exactly once
        for key, t in f.tensors.items():
            runs = sorted(rows.pop(key))
            assert [r for r, _ in runs] == [sum(n for _, n in runs[:i]) for i in range(len(runs))]
            assert sum(n for _, n in runs) == t.shape[0]
    assert not rows
    loads = plan.bytes_per_rank()
    total = sum(sum(sizes) for sizes in layout)
    largest = max(sum(s.nbytes for s in b.slots) for b in plan.buckets)
    assert sum(loads) == total
    assert max(loads) <= total / world_size + largest  # a share plus one bucket, not one file
    assert make_plan(files, world_size, bucket_size) == plan  # deterministic
    assert pickle.loads(pickle.dumps(plan)) == plan  # as rank 0 sends it


@settings(max_examples=200, deadline=None)
@given(layout=layouts, world_size=st.integers(1, 9), bucket_size=st.integers(200, 8000),
       kind=st.sampled_from(["safetensors", "bin"]),
       dtype=st.sampled_from([torch.uint8, torch.int16, torch.float64]))
def test_a_node_image_gives_each_slot_its_own_bytes_and_each_bucket_one_run(
        layout, world_size, bucket_size, kind, dtype):
    files = [file_of(f"file{i}", sizes, kind) for i, sizes in enumerate(layout)]
    plan = make_plan(files, world_size, bucket_size)
    specs = {k: (dtype, t.shape) for f in files for k, t in f.tensors.items()}
    image = ImageLayout.of(plan, specs)
    # (4096 bytes into its storage, as a node image's data is, past its header)
    data = torch.zeros(4096 + image.nbytes, dtype=torch.uint8)[4096:]
    for i, b in enumerate(plan.buckets):  # mark each bucket's slots with its number
        for s in b.slots:
            view = image.slot_bytes(data, s)
            assert view.numel() == s.nbytes // s.dtype.itemsize * dtype.itemsize
            assert (view == 0).all(), "two slots share bytes"
            view.fill_(i % 250 + 1)
    for i, b in enumerate(plan.buckets):  # a bucket's run holds its own slots (and padding)
        begin, end = image.run(b)
        run = data[begin:end]
        assert set(run.unique().tolist()) <= {0, i % 250 + 1}
    tensors = image.tensors(data)
    assert {k: v.shape for k, v in tensors.items()} == {k: t[1] for k, t in specs.items()}
    for k, t in tensors.items():  # the same view as the tensor's own bytes, sliced and typed
        sliced = image.tensor(data, k)
        assert (t.dtype, t.stride(), t.data_ptr()) == (dtype, sliced.stride(), sliced.data_ptr())
    assert all(t.numel() == 0 or (t.view(torch.uint8) != 0).all() for t in tensors.values())


def test_byte_views_are_the_bytes_sliced_and_typed():
    from distshard.byteviews import ByteViews

    data = torch.arange(80, dtype=torch.uint8)[16:]  # (16 bytes into its storage)
    views = ByteViews(data[:62])  # (not a whole number of float64s)
    for begin, dtype, shape in [(0, torch.float32, (2, 3)), (8, torch.int16, (5,)),
                                (16, torch.float64, ()), (24, torch.float64, (0, 4)),
                                (48, torch.float64, (1, 1)), (60, torch.uint8, (2,)),
                                (62, torch.int16, (0,))]:
        got = views.at(begin, dtype, shape)
        want = data[begin:begin + volume(shape) * dtype.itemsize].view(dtype).view(shape)
        assert (got.dtype, got.shape, got.stride()) == (dtype, want.shape, want.stride())
        assert got.numel() == 0 or (got.data_ptr() == want.data_ptr() and torch.equal(got, want))
    with pytest.raises(ValueError, match="multiple"):
        views.at(2, torch.float32, (1,))


def test_loads_whose_node_images_cross_nodes_plan_smaller_buckets():
    from distshard.options import CROSSING_BUCKET_SIZE, DEFAULT_BUCKET_SIZE, LoadOptions

    options = LoadOptions()
    assert options.bucket_size_for(2, node_image=True) == CROSSING_BUCKET_SIZE < DEFAULT_BUCKET_SIZE
    # one node, no shared copy (shards, a GPU, shared_memory=False), or every node reading for
    # itself: the size asked for
    assert options.bucket_size_for(1, node_image=True) == DEFAULT_BUCKET_SIZE
    assert options.bucket_size_for(4, node_image=False) == DEFAULT_BUCKET_SIZE
    assert LoadOptions(locality="node").bucket_size_for(4, node_image=True) == DEFAULT_BUCKET_SIZE
    # a smaller size asked for stays
    assert LoadOptions(bucket_size=1 << 20).bucket_size_for(4, node_image=True) == 1 << 20
