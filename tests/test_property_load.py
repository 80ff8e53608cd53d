"""Property test: random models (names, shapes with zero-size and 0-dim, dtypes), random shard
layouts, bucket sizes and world sizes 1-5 load exactly what a single process reads.

Hypothesis runs on rank 0 of one spawned group of 5; each example is broadcast to the other
ranks, loaded on a sub-group of the drawn size, and every rank's verdict comes back to rank 0.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from corpus import SpecModel, make_state, write_sharded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import distshard
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess
RANKS = 5
EXAMPLES = int(os.environ.get("DISTSHARD_PROPERTY_EXAMPLES", 60))
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool]


@st.composite
def examples(draw):
    modules = st.sampled_from(["", "m", "mb", "m.x", "layer.0", "layer.1"])
    leaves = st.from_regex(r"p[a-z0-9_]{0,4}", fullmatch=True)
    names = draw(st.lists(st.tuples(modules, leaves).map(lambda t: ".".join(p for p in t if p)),
                          min_size=1, max_size=8, unique=True))
    spec, model_dtypes, files = {}, {}, {}
    n_files = draw(st.integers(1, 4))
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        spec[name] = (shape, dtype)
        floats = [d for d in DTYPES if d.is_floating_point]
        model_dtypes[name] = draw(st.sampled_from(floats)) if dtype.is_floating_point else dtype
        files[name] = draw(st.integers(0, n_files - 1))
    return dict(spec=spec, model_dtypes=model_dtypes, files=files, seed=draw(st.integers(0, 9)),
                world_size=draw(st.integers(1, RANKS)),
                bucket_size=draw(st.sampled_from([16, 100, 4096, 1 << 20])))


def write_example(example, path: str) -> None:
    state = make_state(example["spec"], seed=example["seed"])
    n = max(example["files"].values()) + 1
    groups = [{k: v for k, v in state.items() if example["files"][k] == i} for i in range(n)]
    order = [k for g in groups for k in g]  # write_sharded spreads keys round-robin: regroup
    write_sharded(path, {k: state[k] for k in order}, files=1) if n == 1 else _write_groups(path, groups)


def _write_groups(path, groups) -> None:
    import json

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in g.items()}, os.path.join(path, name))
        weight_map.update({k: name for k in g})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)


def load_and_check(example, path, group) -> str | None:
    """Load on this rank; return None if it equals the single-process read, else why not."""
    spec = {k: (shape, example["model_dtypes"][k]) for k, (shape, _) in example["spec"].items()}
    try:  # any error is a verdict: a rank that raised out of the protocol would hang the rest
        model = SpecModel(spec)
        distshard.load(model, path, group=group, bucket_size=example["bucket_size"],
                       log_summary=False)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    reference = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            reference.update(load_file(os.path.join(path, name)))
    got = model.state_dict()
    for k, v in reference.items():
        want = v.to(spec[k][1])
        if got[k].dtype != want.dtype or not torch.equal(got[k], want):
            return f"{k}: {got[k]} != {want}"
    return None


def _property(rank: int, world_size: int, root: str) -> int:
    groups = {k: dist.new_group(list(range(k))) for k in range(1, world_size + 1)}
    if rank != 0:
        while (msg := _recv()) is not None:
            example, path = msg
            k = example["world_size"]
            _verdicts(load_and_check(example, path, groups[k]) if rank < k else None)
        return 0
    count = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(example=examples())
    def prop(example):
        count[0] += 1
        if os.environ.get("DISTSHARD_PROPERTY_TRACE"):
            print("example", count[0], example["world_size"], example["bucket_size"], flush=True)
        path = os.path.join(root, f"ex{count[0]}")
        write_example(example, path)
        _send((example, path))
        k = example["world_size"]
        problems = _verdicts(load_and_check(example, path, groups[k]))
        assert not any(problems), f"world size {k}: {problems}"

    try:
        prop()
    finally:
        _send(None)
    return count[0]


def _send(msg) -> None:
    dist.broadcast_object_list([msg], src=0)


def _recv():
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _verdicts(mine: str | None) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def test_random_models_and_layouts_load_exactly_on_1_to_5_ranks(tmp_path):
    # spawned: each rank its own seed of str hashes, so that sets iterate in another order on
    # each rank (forked ranks share one), and nothing may depend on that order across ranks
    ran = run_ranks(_property, RANKS, str(tmp_path), start_method="spawn",
                    timeout=float(os.environ.get("DISTSHARD_PROPERTY_DEADLINE", 400)))
    assert ran[0] >= EXAMPLES
