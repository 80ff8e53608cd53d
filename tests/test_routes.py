"""Which route a bucket takes (distshard.routes.choose): pure functions of the plan, each rank's
boxes, the destinations' dtypes and the nodes. No processes."""

from __future__ import annotations

import pytest
import torch

from distshard.plan import Bucket, LoadPlan, PlannedFile, Slot
from distshard.routes.choose import choose, maps_files, shares_node_copy, wire_of
from distshard.topology import Topology

ONE_NODE = Topology.single(2)


def _plan(kind: str = "safetensors", dtype=torch.float32) -> LoadPlan:
    """Two buckets of one file: an (8, 4) tensor read by rank 0, a (4,) one read by rank 1."""
    size = dtype.itemsize
    a = Slot("a", dtype, (8, 4), 100 if kind == "safetensors" else None, 0, 32 * size)
    b = Slot("b", dtype, (4,), 100 + 32 * size if kind == "safetensors" else None, 0, 4 * size)
    files = (PlannedFile("f", kind, 1000, 0),)
    return LoadPlan(2, 1 << 20, files, (Bucket(0, "f", a.nbytes, (a,)),
                                        Bucket(1, "f", b.nbytes, (b,))))


ROWS = [{"a": ((0, 0), (4, 4)), "b": ((0,), (2,))}, {"a": ((4, 0), (4, 4)), "b": ((2,), (2,))}]
COLUMNS = [{"a": ((0, 0), (8, 2))}, {"a": ((0, 2), (8, 2))}]


@pytest.mark.parametrize("replication", ["page_cache", "node_image", "broadcast"])
def test_whole_tensors_take_the_loads_replication_route(replication):
    steps = choose(_plan(), [{}, {}], 0, replication=replication, topology=ONE_NODE)
    assert [(s.route, s.bucket.owner) for s in steps] == [(replication, 0), (replication, 1)]


def test_row_shards_of_safetensors_are_read_by_their_own_rank():
    for rank in (0, 1):
        steps = choose(_plan(), ROWS, rank, replication="broadcast", topology=ONE_NODE)
        assert [s.route for s in steps] == ["own_rows", "own_rows"]
        assert [p.box for s in steps for p in s.pieces] == [ROWS[rank]["a"], ROWS[rank]["b"]]


def test_shards_go_as_slices_when_not_rows_not_safetensors_or_not_asked():
    by_columns = choose(_plan(), COLUMNS, 1, replication="broadcast", topology=ONE_NODE)
    assert [s.route for s in by_columns] == ["slices", "broadcast"]  # b is wanted whole
    assert by_columns[0].layouts[1][0][0].box == COLUMNS[1]["a"]
    from_bin = choose(_plan("bin"), ROWS, 0, replication="broadcast", topology=ONE_NODE)
    assert [s.route for s in from_bin] == ["slices", "slices"]
    asked = choose(_plan(), ROWS, 0, replication="broadcast", topology=ONE_NODE,
                   read_own_slices=False)
    assert [s.route for s in asked] == ["slices", "slices"]


def test_a_nodes_shared_copy_never_takes_shards():
    with pytest.raises(AssertionError, match="whole tensors"):
        choose(_plan(), ROWS, 0, replication="node_image", topology=ONE_NODE)
    with pytest.raises(ValueError, match="replication"):
        choose(_plan(), [{}, {}], 0, replication="nfs", topology=ONE_NODE)


def test_node_local_loads_skip_the_buckets_of_other_nodes():
    two = Topology.from_keys([5, 6])  # rank 0 and rank 1 on nodes of their own
    for rank in (0, 1):
        steps = choose(_plan(), [{}, {}], rank, replication="broadcast", topology=two,
                       node_local=True)
        assert [s.bucket.owner for s in steps] == [rank]
    assert len(choose(_plan(), [{}, {}], 0, replication="broadcast", topology=two)) == 2


def test_narrower_destinations_travel_narrowed_and_slices_are_cut_from_the_wire():
    dests = {"a": torch.empty(0, dtype=torch.bfloat16), "b": torch.empty(0, dtype=torch.int64)}
    plan = _plan()
    wire = wire_of(plan.buckets[0], dests)
    assert wire.slots[0].dtype == torch.bfloat16 and wire.nbytes == 64
    assert wire_of(plan.buckets[1], {"b": torch.empty(0, dtype=torch.float64)}) is plan.buckets[1]
    step = choose(plan, COLUMNS, 0, replication="broadcast", topology=ONE_NODE, dests=dests)[0]
    assert step.wire == wire and step.layouts[0][1] == 8 * 2 * 2  # bf16 pieces of the wire


def test_page_cache_needs_one_node_reading_safetensors_in_their_dtypes():
    plan = _plan()
    specs = {"a": (torch.float32, (8, 4)), "b": (torch.float32, (4,))}
    two = Topology.from_keys([5, 6])
    assert maps_files(plan, specs, ONE_NODE, map_checkpoint=True, node_local=False)
    assert maps_files(plan, specs, two, map_checkpoint=True, node_local=True)
    assert not maps_files(plan, specs, two, map_checkpoint=True, node_local=False)
    assert not maps_files(plan, specs, ONE_NODE, map_checkpoint=False, node_local=False)
    assert not maps_files(_plan("bin"), specs, ONE_NODE, map_checkpoint=True, node_local=False)
    widened = {**specs, "b": (torch.float64, (4,))}
    assert not maps_files(plan, widened, ONE_NODE, map_checkpoint=True, node_local=False)


def test_a_node_shares_a_copy_only_for_whole_tensors_on_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    args = dict(world_size=2, group_device=cpu, device=cpu, shared_memory=None)
    assert shares_node_copy(all_whole_on_cpu=True, **args)
    assert not shares_node_copy(all_whole_on_cpu=False, **args)
    assert not shares_node_copy(all_whole_on_cpu=True, **{**args, "shared_memory": False})
    assert not shares_node_copy(all_whole_on_cpu=True, **{**args, "world_size": 1})
    assert not shares_node_copy(all_whole_on_cpu=True, **{**args, "device": cuda})
    with pytest.raises(ValueError, match="CPU process group"):
        shares_node_copy(all_whole_on_cpu=True, **{**args, "group_device": cuda,
                                                   "shared_memory": True})


def test_buckets_cross_nodes_in_rounds_of_distinct_owners_and_as_read_ones_alone():
    from distshard.routes.image_layout import ImageLayout
    from distshard.routes.node_image import NodeImageRoute

    # owners as the plan deals buckets (in turn, the last turns short); t5's model tensor is
    # float64, so its bucket crosses as read (smaller) and is converted by its receivers
    owners = [0, 1, 2, 3, 0, 1, 2, 3, 1, 2, 1]
    slots = [Slot(f"t{i}", torch.float32, (4,), 100 + 16 * i, 0, 16) for i in range(len(owners))]
    plan = LoadPlan(4, 1 << 20, (PlannedFile("f", "safetensors", 1000, 0),),
                    tuple(Bucket(o, "f", 16, (s,)) for o, s in zip(owners, slots)))
    specs = {s.key: (torch.float32, (4,)) for s in slots} | {"t5": (torch.float64, (4,))}
    run = list(plan.buckets)
    _, raw = NodeImageRoute(None, ImageLayout.of(plan, specs))._spans(run, True, me=0)
    assert raw == [i == 5 for i in range(len(run))]
    assert NodeImageRoute._rounds(run, raw) == [[0, 1, 2, 3], [4], [5], [6, 7, 8], [9, 10]]


def test_a_receiver_allocates_its_image_pages_ahead_of_what_it_receives():
    import os
    import secrets

    from distshard import shm
    from distshard.shm import NodeImage

    image = NodeImage(secrets.token_hex(8), 0, 8 << 20, 1)

    def allocated() -> int:
        return os.fstat(image._fd).st_blocks * 512

    try:
        before = allocated()
        if not image.prefault(100, (4 << 20) + 100):
            pytest.skip("no C library madvise to call" if shm._madvise is None else
                        "this kernel lacks madvise(MADV_POPULATE_WRITE) (Linux 5.14)")
        # the range's pages (and no more than the range's, rounded to pages), nothing written
        assert 4 << 20 <= allocated() - before <= (4 << 20) + 3 * os.sysconf("SC_PAGE_SIZE")
        assert not image.data[: 4 << 20].any()
        # a range past the end is cut at the image's end; one wholly past it is nothing
        page = os.sysconf("SC_PAGE_SIZE")
        assert image.prefault((8 << 20) - 100, 9 << 20) and image.prefault(8 << 20, 9 << 20)
        assert (4 << 20) + page <= allocated() - before <= (8 << 20) + 2 * page
    finally:
        image.close()
        image.unlink()


def test_a_rank_drops_its_page_table_entries_of_what_it_wrote_and_the_bytes_stay():
    import os
    import secrets

    from distshard.shm import NodeImage

    def mapped_shmem() -> int:  # shared memory pages this process maps
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssShmem"))

    image = NodeImage(secrets.token_hex(8), 0, 8 << 20, 1)
    try:
        image.data[: 4 << 20].fill_(7)
        before = mapped_shmem()
        assert image.forget(0, 4 << 20)
        assert mapped_shmem() <= before - (4 << 20) + os.sysconf("SC_PAGE_SIZE")
        assert bool((image.data[: 4 << 20] == 7).all()) and not image.data[4 << 20:].any()
    finally:
        image.close()
        image.unlink()
