"""One process, no process group: formats, dtypes, devices, strictness and bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from checkpoints import CASES, assert_same, empty_model, reference, write_bin_shards
from safetensors.torch import save_file

import distshard
from distshard import DistShardError
from distshard.index import find_checkpoint


class Net(torch.nn.Module):
    """Small model with a persistent and a non-persistent buffer and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2, bias=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.full((2,), 0.5), persistent=False)


def net_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = Net().state_dict()
    state["steps"] = torch.tensor(7)
    return state


def meta_net() -> Net:
    with init_empty_weights():
        return Net()


def write_safetensors(path, state: dict[str, torch.Tensor], files: int = 2) -> str:
    """The Hugging Face safetensors layout, keys spread round-robin over ``files`` shards."""
    os.makedirs(path, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys[i::files]}, os.path.join(path, name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[i::files]})
    write_index(path, weight_map)
    return str(path)


def write_index(path, weight_map: dict[str, str], name="model.safetensors.index.json") -> None:
    with open(os.path.join(path, name), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def assert_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# --- formats ------------------------------------------------------------------------------

def test_every_case_loads_without_a_process_group(checkpoints):
    for name, path in checkpoints.items():
        model = empty_model(CASES[name][0])
        report = distshard.load(model, path, bucket_size=4096)
        assert_same(model, reference(name, path), name)
        assert report.world_size == 1 and report.bytes_read == report.total_bytes_read > 0


@pytest.mark.parametrize("case,file", [
    ("llama", "model.safetensors.index.json"), ("llama-bin", "pytorch_model.bin.index.json"),
    ("llama-single", "model.safetensors"), ("gpt2-single-bin", "pytorch_model.bin")])
def test_a_file_path_works_as_well_as_its_folder(checkpoints, case, file):
    model = empty_model(CASES[case][0])
    distshard.load(model, os.path.join(checkpoints[case], file))
    assert_same(model, reference(case, checkpoints[case]), case)


def test_safetensors_wins_where_both_formats_exist(tmp_path):
    write_safetensors(tmp_path, net_state(1))
    write_bin_shards(net_state(2), str(tmp_path), files=2)
    assert find_checkpoint(tmp_path).kind == "safetensors"
    model = meta_net()
    distshard.load(model, tmp_path)
    assert_state(model, net_state(1))


def test_tied_weights_are_retied_and_read_once(checkpoints):
    model = empty_model("gpt2")
    assert model.lm_head.weight is not model.transformer.wte.weight  # how accelerate leaves it
    report = distshard.load(model, checkpoints["gpt2-single-bin"])  # this file holds both names
    assert model.lm_head.weight is model.transformer.wte.weight
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(report.loaded_keys)
    wte = model.transformer.wte.weight
    assert report.bytes_read == sum(p.numel() * p.element_size() for p in model.parameters())
    assert wte.numel() > 0


# --- dtypes and devices -------------------------------------------------------------------

def test_the_models_dtype_wins_and_floating_data_converts(tmp_path):
    state = net_state()
    write_safetensors(tmp_path, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                 for k, v in state.items()})
    model = meta_net()
    distshard.load(model, tmp_path)
    assert model.a.weight.dtype == torch.float32
    assert torch.equal(model.a.weight, state["a.weight"].to(torch.bfloat16).float())
    assert model.steps.dtype == torch.int64 and int(model.steps) == 7


def test_dtype_option_converts_floating_tensors_only(tmp_path):
    state = net_state()
    write_safetensors(tmp_path, state)
    model = meta_net()
    distshard.load(model, tmp_path, dtype=torch.float16)
    assert model.a.weight.dtype == torch.float16
    assert torch.equal(model.a.weight, state["a.weight"].half())
    assert model.steps.dtype == torch.int64


def test_real_parameters_are_loaded_in_place(tmp_path):
    state = net_state()
    write_safetensors(tmp_path, state)
    model = Net()
    weight = model.a.weight
    distshard.load(model, tmp_path)
    assert model.a.weight is weight and weight.requires_grad
    assert_state(model, state)


def test_meta_device_construction_without_buffers_works(checkpoints):
    with torch.device("meta"):
        model = type(empty_model("gpt2"))(empty_model("gpt2").config).eval()
    distshard.load(model, checkpoints["gpt2"])
    assert_same(model, reference("gpt2", checkpoints["gpt2"]))


def test_a_non_persistent_buffer_left_on_meta_is_named_with_the_fix(checkpoints):
    model = empty_model("llama")
    with torch.device("meta"):
        model = type(model)(model.config)
    with pytest.raises(DistShardError, match=r"model\.rotary_emb\.inv_freq.*init_empty_weights"):
        distshard.load(model, checkpoints["llama"])
    assert all(p.is_meta for p in model.parameters())  # nothing half-loaded


# --- strictness ---------------------------------------------------------------------------

def test_strict_lists_missing_and_unexpected_keys_sorted(tmp_path):
    state = net_state()
    state["z.extra"] = torch.ones(2)
    state["y.extra"] = torch.ones(2)
    del state["b.weight"], state["a.bias"]
    write_safetensors(tmp_path, state)
    model = meta_net()
    with pytest.raises(DistShardError) as e:
        distshard.load(model, tmp_path)
    msg = str(e.value)
    assert "missing keys (2): a.bias, b.weight" in msg
    assert "unexpected keys (2): y.extra, z.extra" in msg
    assert "strict=False" in msg
    assert all(p.is_meta for p in model.parameters())


def test_non_strict_reports_keys_and_keeps_real_values(tmp_path):
    state = net_state()
    state["z.extra"] = torch.ones(2)
    del state["b.weight"]
    write_safetensors(tmp_path, state)
    model = Net()  # b.weight is real: it keeps its value
    b_before = model.b.weight.detach().clone()
    report = distshard.load(model, tmp_path, strict=False)
    assert report.missing_keys == ["b.weight"] and report.unexpected_keys == ["z.extra"]
    assert "z.extra" not in report.loaded_keys
    assert torch.equal(model.b.weight, b_before)
    assert torch.equal(model.a.weight, state["a.weight"])
    unexpected_bytes = 2 * 4
    assert report.bytes_read == sum(v.numel() * v.element_size() for v in state.values()) - unexpected_bytes


class NetWithGain(Net):
    """A parameter of a module that has no initialisation of its own (no reset_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(2))


def test_non_strict_never_leaves_a_missing_meta_parameter_uninitialised(tmp_path):
    write_safetensors(tmp_path, net_state())  # no "gain"
    with init_empty_weights():
        model = NetWithGain()
    with pytest.raises(DistShardError, match=r"gain.*meta") as e:
        distshard.load(model, tmp_path, strict=False)
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(DistShardError, match="strict=False would not help") as e:
        distshard.load(model, tmp_path)
    assert "pass strict=False" not in str(e.value)


def test_non_strict_initialises_a_missing_meta_parameter_as_its_module_does(tmp_path):
    """A new layer (nn.Linear on meta): its reset_parameters, from a seed rank 0 draws, so
    torch.manual_seed makes it repeatable; listed as missing and initialized."""
    state = net_state()
    del state["b.weight"]
    write_safetensors(tmp_path, state)
    values = []
    for _ in range(2):
        model = meta_net()
        torch.manual_seed(3)
        report = distshard.load(model, tmp_path, strict=False)
        assert report.missing_keys == ["b.weight"] and report.initialized_keys == ["b.weight"]
        assert torch.equal(model.a.weight, state["a.weight"])
        values.append(model.b.weight.detach().clone())
    assert torch.equal(values[0], values[1])
    bound = 1 / 3 ** 0.5  # Linear(3, 2).reset_parameters: kaiming uniform, fan_in 3
    assert values[0].abs().max() <= bound and values[0].std() > 0


# --- bad input ----------------------------------------------------------------------------

def test_shape_mismatch_names_file_and_key(tmp_path):
    state = net_state()
    state["a.weight"] = torch.ones(5, 4)
    write_safetensors(tmp_path, state)
    with pytest.raises(DistShardError, match=r"rank 0.*model-0000\d-of-00002.*'a\.weight'.*\[5, 4\]") as e:
        distshard.load(meta_net(), tmp_path)
    assert e.value.key == "a.weight" and e.value.file.startswith("model-")


@pytest.mark.parametrize("key,value", [("a.weight", torch.ones(3, 4, dtype=torch.int32)),
                                       ("steps", torch.tensor(1.5)),
                                       ("a.bias", torch.ones(3, dtype=torch.bool))])
def test_data_of_another_kind_is_refused(tmp_path, key, value):
    state = net_state()
    state[key] = value
    write_safetensors(tmp_path, state)
    with pytest.raises(DistShardError, match=f"dtype mismatch for key '{key}'"):
        distshard.load(meta_net(), tmp_path)


@pytest.mark.parametrize("bad_name,pattern", [
    ("/etc/passwd", "absolute path"), ("../outside.safetensors", "leaves the checkpoint"),
    ("sub/../../x.safetensors", "leaves the checkpoint")])
def test_index_paths_must_stay_inside_the_checkpoint(tmp_path, bad_name, pattern):
    write_safetensors(tmp_path, net_state())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["a.weight"] = bad_name
    write_index(tmp_path, index["weight_map"])
    with pytest.raises(DistShardError, match=pattern):
        distshard.load(meta_net(), tmp_path)


def test_a_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    write_safetensors(outside, net_state())
    write_safetensors(ckpt, net_state())
    name = "model-00001-of-00002.safetensors"
    os.remove(ckpt / name)
    os.symlink(outside / name, ckpt / name)
    with pytest.raises(DistShardError, match="outside the checkpoint folder"):
        distshard.load(meta_net(), ckpt)


def test_hugging_face_cache_snapshots_may_link_into_blobs(tmp_path):
    repo = tmp_path / "models--org--net"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    write_safetensors(blobs, net_state())
    snap.mkdir(parents=True)
    for name in os.listdir(blobs):
        os.rename(blobs / name, blobs / f"sha-{name}")
        os.symlink(os.path.join("..", "..", "blobs", f"sha-{name}"), snap / name)
    model = meta_net()
    distshard.load(model, snap)
    assert_state(model, net_state())


def test_missing_shard_and_directory_shard_are_named(tmp_path):
    write_safetensors(tmp_path, net_state())
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(DistShardError, match="'model-00002-of-00002.safetensors'.*does not exist"):
        distshard.load(meta_net(), tmp_path)
    os.mkdir(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(DistShardError, match="not a regular file"):
        distshard.load(meta_net(), tmp_path)


def test_key_named_by_index_but_absent_from_its_file(tmp_path):
    write_safetensors(tmp_path, net_state())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["a.weight"] = ({"model-00001-of-00002.safetensors",
                                        "model-00002-of-00002.safetensors"}
                                       - {index["weight_map"]["a.weight"]}).pop()
    write_index(tmp_path, index["weight_map"])
    with pytest.raises(DistShardError, match="'a.weight'.*header does not hold it"):
        distshard.load(meta_net(), tmp_path)


def test_same_key_in_two_files(tmp_path):
    write_safetensors(tmp_path, net_state())
    save_file({"a.weight": torch.ones(3, 4)}, tmp_path / "extra.safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["z"] = "extra.safetensors"
    write_index(tmp_path, index["weight_map"])
    with pytest.raises(DistShardError, match="'a.weight' is in two files"):
        distshard.load(meta_net(), tmp_path)


def test_corrupt_header_is_refused_by_safetensors_validation(tmp_path):
    write_safetensors(tmp_path, net_state())
    path = tmp_path / "model-00001-of-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    with pytest.raises(DistShardError, match="'model-00001-of-00002.safetensors' is not a valid safetensors"):
        distshard.load(meta_net(), tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"a.weight": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(DistShardError, match="weights_only"):
        distshard.load(meta_net(), tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text", ["{not json", "{}", '{"weight_map": {}}', "[]"])
def test_an_index_that_names_no_files_is_refused(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(DistShardError, match="model.safetensors.index.json"):
        distshard.load(meta_net(), tmp_path)


def test_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(DistShardError, match="no checkpoint in folder"):
        distshard.load(meta_net(), tmp_path)


# --- options ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,pattern", [
    (dict(bucket_size=0), "bucket_size"), (dict(dtype=torch.int32), "dtype"),
    (dict(device="meta"), "meta")])
def test_bad_options_raise_value_error(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        distshard.load(meta_net(), tmp_path, **kwargs)


def test_group_without_torch_distributed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not initialised"):
        distshard.load(meta_net(), tmp_path, group=object())


def test_checkpoint_copied_elsewhere_still_loads(tmp_path):
    write_safetensors(tmp_path / "a", net_state())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    model = meta_net()
    distshard.load(model, tmp_path / "b")
    assert_state(model, net_state())


def test_a_file_that_changes_after_planning_is_refused(tmp_path):
    from distshard.index import describe_file
    from distshard.plan import make_plan
    from distshard.reader import ShardReader

    write_safetensors(tmp_path, net_state(), files=1)
    name = "model-00001-of-00001.safetensors"
    plan = make_plan([describe_file(str(tmp_path), name, "safetensors")], 1, 1 << 20)
    with open(tmp_path / name, "ab") as f:
        f.write(b"\0" * 8)
    reader = ShardReader(str(tmp_path), plan)
    buf = torch.empty(plan.buckets[0].nbytes, dtype=torch.uint8)
    with pytest.raises(DistShardError, match=f"{name}.*changed after it was planned"):
        reader.read(plan.buckets[0], buf)


def _planned(tmp_path):
    from distshard.index import describe_file
    from distshard.plan import make_plan

    write_safetensors(tmp_path, net_state(), files=1)
    name = "model-00001-of-00001.safetensors"
    return name, make_plan([describe_file(str(tmp_path), name, "safetensors")], 1, 64)


@pytest.mark.parametrize("advice", ["populate", "einval"])
def test_populated_buckets_map_to_the_checkpoint_values(tmp_path, monkeypatch, advice):
    import distshard.reader
    from distshard.reader import ShardReader, map_files

    name, plan = _planned(tmp_path)
    if advice == "einval":  # a kernel without MADV_POPULATE_READ: read and drop instead
        monkeypatch.setattr(distshard.reader, "_POPULATE_READ", 12345)
    reader = ShardReader(str(tmp_path), plan)
    for bucket in plan.buckets:
        reader.populate(bucket)
    reader.close()
    assert reader.bytes_read == sum(s.nbytes for b in plan.buckets for s in b.slots)
    tensors = map_files(str(tmp_path), plan, list(plan.buckets))
    want = net_state()
    assert sorted(tensors) == sorted(want)
    for key, value in want.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    tensors["a.weight"].add_(1)  # copy-on-write: the file keeps its bytes
    assert torch.equal(map_files(str(tmp_path), plan, list(plan.buckets))["a.weight"],
                       want["a.weight"])


def test_a_file_that_changes_before_mapping_is_refused(tmp_path):
    from distshard.reader import map_files

    name, plan = _planned(tmp_path)
    with open(tmp_path / name, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(DistShardError, match=f"{name}.*changed after it was planned"):
        map_files(str(tmp_path), plan, list(plan.buckets))


@pytest.mark.parametrize("how", ["read", "read-and-drop"])
def test_a_file_that_ends_early_names_the_tensor_where_it_ended(tmp_path, monkeypatch, how):
    import distshard.reader
    from distshard.reader import ShardReader

    name, plan = _planned(tmp_path)
    bucket = max(plan.buckets, key=lambda b: len(b.slots))  # several tensors, one run
    assert len(bucket.slots) > 1
    second = bucket.slots[1]
    real = os.preadv

    def short(fd, views, offset):  # the file "ends" inside the bucket's second tensor
        stop = second.begin + 1
        if offset >= stop:
            return 0
        room = stop - offset
        views = [v[:max(0, min(len(v), room - sum(len(u) for u in views[:i])))]
                 for i, v in enumerate(views)]
        return real(fd, [v for v in views if len(v)], offset)

    monkeypatch.setattr(distshard.reader.os, "preadv", short)
    reader = ShardReader(str(tmp_path), plan)
    with pytest.raises(DistShardError, match="ended early") as failed:
        if how == "read":
            reader.read(bucket, torch.empty(bucket.nbytes, dtype=torch.uint8))
        else:  # a kernel without MADV_POPULATE_READ reads and drops
            monkeypatch.setattr(distshard.reader, "_POPULATE_READ", 12345)
            reader.populate(bucket)
    reader.close()
    assert failed.value.key == second.key and failed.value.file == name


def test_a_bin_file_swapped_after_its_check_is_not_read(tmp_path, monkeypatch):
    # A .bin file is checked (size, mtime) on the descriptor the reader opened; torch.load then
    # reads that same file, not whatever the name points to a moment later.
    import distshard.reader

    write_bin_shards(net_state(1), str(tmp_path), files=1)
    name = "pytorch_model-00001-of-00001.bin"
    impostor = tmp_path / "impostor.bin"
    torch.save(net_state(2), impostor)  # the same keys and sizes, other values
    real = distshard.reader._open_planned

    def open_then_swap(root, f):
        fd = real(root, f)
        st = os.stat(tmp_path / name)
        if impostor.exists():
            os.truncate(impostor, st.st_size)  # same size (the zip stays readable up to it)
            os.utime(impostor, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(impostor, tmp_path / name)
        return fd

    monkeypatch.setattr(distshard.reader, "_open_planned", open_then_swap)
    model = meta_net()
    distshard.load(model, tmp_path)
    assert_state(model, net_state(1))


def test_tied_weights_stored_twice_in_safetensors_are_named_in_a_warning(tmp_path, caplog,
                                                                          checkpoints):
    from safetensors.torch import save_file

    model = empty_model("gpt2")
    model.tie_weights()
    ref = reference("gpt2", checkpoints["gpt2"])
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1  # a second, different copy
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="distshard"):
        distshard.load(model, tmp_path, strict=False, log_summary=False)
    warned = [r.getMessage() for r in caplog.records if "ties them" in r.getMessage()]
    assert len(warned) == 1 and "'lm_head.weight'" in warned[0], warned
    assert "'transformer.wte.weight'" in warned[0]
    caplog.clear()
    for case in ("gpt2", "gpt2-single-bin"):  # saved once, or twice over one storage: no warning
        with caplog.at_level("WARNING", logger="distshard"):
            distshard.load(empty_model("gpt2"), checkpoints[case], log_summary=False)
        assert not [r for r in caplog.records if "ties them" in r.getMessage()], case
