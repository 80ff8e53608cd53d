"""``save``: Hugging Face checkpoints written in parallel from replicated and DTensor models,
read back bitwise by transformers and by distshard.load; failures on one rank; one process.

Each multi-process test spawns one group and runs several checks inside it (spawning costs
seconds). Rank bodies are module-level functions so that spawned processes can import them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from checkpoints import _configs, empty_model
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import distshard
from distshard import DistShardError
from distshard.shardfiles import parse_size, plan_shards
from distshard.testing import run_ranks
from distshard.writer import save

DEADLINE = 240
SHARD = "40KB"  # several files for every model here


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model with random weights: ``llama`` ties its embeddings."""
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)).eval()
    cls, config = _configs()[family]
    return cls(config).eval()


class Plain(torch.nn.Module):
    """Not a transformers model: tied linears, a norm with integer persistent buffers, a
    non-persistent buffer that must not be saved."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(16, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.second = torch.nn.Linear(16, 16)
        self.second.weight = self.first.weight
        self.register_buffer("scratch", torch.ones(4), persistent=False)
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))
        with torch.no_grad():
            self.norm.running_mean.normal_()
            self.norm.num_batches_tracked.fill_(7)


def everything(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (every tied name) and persistent buffer."""
    return dict(model.state_dict(keep_vars=False))


def assert_equal_tensors(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), f"{where}: names differ: {set(got) ^ set(want)}"
    for key, value in want.items():
        assert got[key].dtype == value.dtype, f"{where}: {key} dtype"
        assert torch.equal(got[key], value), f"{where}: {key} differs"


def headers(folder: str) -> dict[str, dict[str, tuple]]:
    """file -> key -> (dtype, shape), and each file's metadata under '__metadata__'."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out[name] = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                             for k in f.keys()}
                out[name]["__metadata__"] = f.metadata()
    return out


def source_of(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def no_leftovers(folder: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".")]


def check_hf_checkpoint(folder: str, original: torch.nn.Module, reference_dir: str) -> None:
    """Loads bitwise in transformers and distshard.load; index and names as transformers'."""
    want = everything(original)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert_equal_tensors(everything(loaded), want, f"from_pretrained {folder}")
    model = empty_model_like(original)
    distshard.load(model, folder, log_summary=False)
    assert_equal_tensors(everything(model), want, f"distshard.load {folder}")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    with open(os.path.join(reference_dir, "model.safetensors.index.json")) as f:
        expected = json.load(f)
    assert index["weight_map"] == expected["weight_map"]  # same keys, same files, same names
    files = headers(folder)
    keys = [k for h in files.values() for k in h if k != "__metadata__"]
    assert len(keys) == len(set(keys)) == len(index["weight_map"])  # every key once
    assert all(index["weight_map"][k] == name for name, h in files.items() for k in h
               if k != "__metadata__")
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for k, t in want.items() if k in index["weight_map"])
    assert all(h["__metadata__"] == {"format": "pt"} for h in files.values())
    assert len(files) > 1 and not no_leftovers(folder)


def empty_model_like(model: torch.nn.Module) -> torch.nn.Module:
    family = "llama" if isinstance(model, LlamaForCausalLM) else "gpt2"
    if family == "gpt2":
        return empty_model("gpt2")
    from accelerate import init_empty_weights
    with init_empty_weights():
        return LlamaForCausalLM(model.config).eval()


# --- (a) replicated models from two ranks ------------------------------------------------------

def _save_replicated(rank: int, world_size: int, root: str) -> dict:
    out = {}
    for family in ("llama", "gpt2"):
        report = save(build(family), os.path.join(root, family), max_shard_size=SHARD)
        out[family] = (report.files, report.files_written, report.bytes_written_per_rank,
                       report.bytes_received, report.total_size)
    alone = dist.new_group([1])  # a sub-group: rank 1 saves by itself
    if rank == 1:
        report = save(build("llama"), os.path.join(root, "sub-group"), max_shard_size=SHARD,
                      group=alone)
        out["sub-group"] = (report.rank, report.world_size, report.files_written, report.files)
    return out


@pytest.mark.multiprocess
def test_replicated_models_saved_by_two_ranks_load_bitwise(tmp_path):
    results = run_ranks(_save_replicated, 2, str(tmp_path), timeout=DEADLINE)
    for family in ("llama", "gpt2"):
        folder = str(tmp_path / family)
        original = build(family)
        reference_dir = str(tmp_path / f"{family}-reference")
        original.save_pretrained(reference_dir, max_shard_size=SHARD)
        check_hf_checkpoint(folder, original, reference_dir)
        files, _, per_rank, _, total = results[0][family]
        written = [r[family][1] for r in results]
        shards = [f for f in files if f.endswith(".safetensors")]
        assert sorted(written[0] + written[1]) == sorted(shards) and all(written)  # both wrote
        assert per_rank == [sum(os.path.getsize(os.path.join(folder, f)) for f in w)
                            for w in written]
        assert all(r[family][3] == 0 for r in results)  # replicated: nothing sent
        index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
        assert total == index["metadata"]["total_size"]
    group_rank, size, written, files = results[1]["sub-group"]
    assert (group_rank, size) == (0, 1) and written == [f for f in files if f.endswith("tensors")]
    check_hf_checkpoint(str(tmp_path / "sub-group"), build("llama"), str(tmp_path / "llama-reference"))
    tied = json.load(open(tmp_path / "llama" / "model.safetensors.index.json"))["weight_map"]
    assert "model.embed_tokens.weight" in tied and "lm_head.weight" not in tied
    gpt2 = json.load(open(tmp_path / "gpt2" / "model.safetensors.index.json"))["weight_map"]
    assert "transformer.wte.weight" in gpt2 and "lm_head.weight" not in gpt2


# --- (b) DTensor models: FSDP2 and tensor parallel ---------------------------------------------

LLAMA_TP = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}


def _expected_received(model: torch.nn.Module, files: list[str], folder: str) -> int:
    """Bytes the writer of ``files`` must receive if each distinct piece it lacks comes once:
    the whole of each DTensor in them minus the box this rank holds itself. Collective."""
    boxes = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                  p.placements)
            boxes[name] = (tuple(offset), tuple(shape), p.numel() * p.element_size(),
                           p.to_local().numel() * p.element_size())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, boxes)
    mine = set()
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            mine.update(f.keys())
    return sum(total - own for key, (_, _, total, own) in boxes.items() if key in mine)


def _save_dtensors(rank: int, world_size: int, root: str) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    calls = []
    DTensor.full_tensor = lambda self, *a, **k: calls.append(1)  # must never be needed
    out = {}
    for how in ("fsdp2", "tp", "mixed"):
        if how == "mixed":  # a replicated DTensor and a column-sharded one in a plain module
            model = Plain()
            torch.manual_seed(1)
            w = torch.randn(16, 16)
            model.first.weight = torch.nn.Parameter(distribute_tensor(w, mesh, [Replicate()]))
            model.second.weight = torch.nn.Parameter(distribute_tensor(w * 2, mesh, [Shard(1)]))
        else:
            model = build("llama")
            for block in model.model.layers:
                if how == "fsdp2":
                    fully_shard(block, mesh=mesh)
                else:
                    parallelize_module(block, mesh, LLAMA_TP)
            if how == "fsdp2":
                fully_shard(model, mesh=mesh)
        folder = os.path.join(root, how)
        # mixed: three files, the replicated one written by rank 1, which needs nothing sent
        report = save(model, folder, max_shard_size=1100 if how == "mixed" else "20KB")
        out[how] = dict(received=report.bytes_received, sent=report.bytes_sent,
                        expected=_expected_received(model, report.files_written, folder),
                        peak=report.peak_staging_bytes, files=report.files,
                        largest=max(os.path.getsize(os.path.join(folder, f))
                                    for f in report.files), total=report.total_size)
    out["full_tensor_calls"] = len(calls)
    return out


@pytest.mark.multiprocess
def test_dtensor_models_are_gathered_only_on_each_files_writer(tmp_path):
    results = run_ranks(_save_dtensors, 2, str(tmp_path), timeout=DEADLINE)
    assert all(r["full_tensor_calls"] == 0 for r in results)
    reference = build("llama")
    for how in ("fsdp2", "tp"):
        folder = str(tmp_path / how)
        reference_dir = str(tmp_path / f"{how}-reference")
        reference.save_pretrained(reference_dir, max_shard_size="20KB")
        check_hf_checkpoint(folder, reference, reference_dir)
    torch.manual_seed(1)
    w = torch.randn(16, 16)
    mixed = source_of(str(tmp_path / "mixed"))
    assert torch.equal(mixed["first.weight"], w) and torch.equal(mixed["second.weight"], w * 2)
    assert len(headers(str(tmp_path / "mixed"))) == 3
    for how in ("fsdp2", "tp", "mixed"):
        per_rank = [r[how] for r in results]
        for r in per_rank:
            assert r["received"] == r["expected"], (how, per_rank)  # each piece once, to its writer
            assert r["peak"] <= 2 * r["largest"] < r["total"] or how == "mixed", (how, r)
        assert sum(r["received"] for r in per_rank) == sum(r["sent"] for r in per_rank)
        # a gather of every tensor on every rank would move (ranks - 1) x the sharded bytes
        assert sum(r["received"] for r in per_rank) < per_rank[0]["total"]
        if how != "mixed":
            assert all(r["received"] > 0 for r in per_rank)


# --- (c) a failure on one rank ----------------------------------------------------------------

def _fail_on_one_rank(rank: int, world_size: int, root: str) -> dict:
    import distshard.writer as writer

    folder = os.path.join(root, "ckpt")
    save(build("llama", seed=1), folder, max_shard_size=SHARD)  # an earlier good save
    before = {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}
    dist.barrier()
    real = writer.write_all

    def disk_full(fd, data):  # rank 1 runs out of space halfway through its first file
        real(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    out = {}
    for case in ("disk full", "another model"):
        if rank == 1 and case == "disk full":
            writer.write_all = disk_full
        model = build("gpt2" if rank == 1 and case == "another model" else "llama", seed=2)
        try:
            save(model, folder, max_shard_size=SHARD)
            out[case] = None
        except DistShardError as e:
            out[case] = (str(e), e.file)
        writer.write_all = real
        dist.barrier()
        after = {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}
        out[case, "unchanged"] = after == before
        out[case, "leftovers"] = no_leftovers(folder)
    return out


@pytest.mark.multiprocess
def test_a_failure_on_one_rank_raises_everywhere_and_leaves_the_old_checkpoint(tmp_path):
    results = run_ranks(_fail_on_one_rank, 2, str(tmp_path), timeout=DEADLINE)
    for rank, r in enumerate(results):
        message, file = r["disk full"]
        assert "save failed on rank(s) 1" in message and "No space left on device" in message
        assert file is not None and file.startswith("model-") and file in message
        message, _ = r["another model"]
        assert "differs from rank 0's" in message, message
        for case in ("disk full", "another model"):
            assert r[case, "unchanged"], f"rank {rank}, {case}: the earlier checkpoint changed"
            assert r[case, "leftovers"] == [], f"rank {rank}, {case}: {r[case, 'leftovers']}"
    model = empty_model_like(build("llama"))
    distshard.load(model, str(tmp_path / "ckpt"), log_summary=False)
    assert_equal_tensors(everything(model), everything(build("llama", seed=1)), "earlier save")


# --- (d) one process, no process group --------------------------------------------------------

def test_single_process_save_of_a_plain_module(tmp_path):
    torch.manual_seed(0)
    model = Plain()
    report = save(model, tmp_path / "many", max_shard_size=1100)
    files = headers(str(tmp_path / "many"))
    saved = {k for h in files.values() for k in h if k != "__metadata__"}
    # tied: the first name in state_dict order; persistent buffers in, non-persistent out
    assert "first.weight" in saved and "second.weight" not in saved and "scratch" not in saved
    assert {"norm.num_batches_tracked", "norm.running_mean", "steps"} <= saved
    assert len(files) == len(report.files_written) > 1 and report.world_size == 1
    with open(tmp_path / "many" / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"]) == saved
    again = Plain()
    distshard.load(again, str(tmp_path / "many"), log_summary=False)
    assert_equal_tensors(everything(again), everything(model), "plain module")
    assert again.second.weight is again.first.weight

    # one file: model.safetensors and no index; the shards and index of before are removed
    save(model, tmp_path / "many", max_shard_size="1GB")
    assert sorted(os.listdir(tmp_path / "many")) == ["model.safetensors"]
    again = Plain()
    distshard.load(again, str(tmp_path / "many"), log_summary=False)
    assert_equal_tensors(everything(again), everything(model), "plain module, one file")


def test_meta_tensors_and_bad_sizes_are_refused(tmp_path):
    with torch.device("meta"):
        model = Plain()
    with pytest.raises(DistShardError, match="on the meta device.*first.weight"):
        save(model, tmp_path / "meta")
    assert not os.path.exists(tmp_path / "meta" / "model.safetensors")
    for bad in ("5 apples", "1.5G", 0, -3, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            save(Plain(), tmp_path / "bad", max_shard_size=bad)


@pytest.mark.parametrize("size", ["5GB", "200MB", "40KB", "40Kb", "8mb", "20.5KB", "1TB",
                                  " 3 GB "])
def test_sizes_mean_what_they_mean_in_transformers(size):
    # transformers 5's save_pretrained reads max_shard_size with huggingface_hub's rule
    assert parse_size(size) == parse_size_to_int(size)


@pytest.mark.parametrize("size,value", [("1MiB", 2**20), ("3GiB", 3 * 2**30), ("10kib", 10240),
                                        (12345, 12345)])
def test_binary_units_and_bytes_too(size, value):
    assert parse_size(size) == value


@pytest.mark.parametrize("size", ["5G", "MB", "-1MB", "0KB", "1e400GB", "five MB", 0, True, 1.5])
def test_sizes_that_mean_nothing_are_refused(size):
    with pytest.raises(ValueError):
        parse_size(size)


@pytest.mark.parametrize("sizes,limit", [([6, 6, 2, 6, 2, 2, 20], 40), ([30, 1, 1, 50, 3], 24),
                                         ([5], 1000), ([], 10)])
def test_shard_plan_is_the_one_transformers_makes(sizes, limit):
    state = {f"layer.{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    want = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
    shards = plan_shards(((k, t.dtype, tuple(t.shape)) for k, t in state.items()), limit)
    got = {s.name: sorted(t.key for t in s.tensors) for s in shards}
    assert got == {name: sorted(keys) for name, keys in want.filename_to_tensors.items()} or (
        not state and got == {"model.safetensors": []})


def test_a_save_failing_while_staging_its_config_leaves_the_earlier_checkpoint(tmp_path):
    class FullDisk:  # a config whose file cannot be written
        def save_pretrained(self, folder):
            raise OSError(28, "No space left on device")

    torch.manual_seed(0)
    earlier = Plain()
    save(earlier, tmp_path, max_shard_size=200)
    before = {n: (tmp_path / n).read_bytes() for n in sorted(os.listdir(tmp_path))}
    assert "model.safetensors.index.json" in before
    later = Plain()
    later.config = FullDisk()
    with pytest.raises(DistShardError, match="No space left"):
        save(later, tmp_path, max_shard_size=200)
    after = {n: (tmp_path / n).read_bytes() for n in sorted(os.listdir(tmp_path))}
    assert after == before  # the earlier save, whole: nothing renamed, nothing left behind
    model = Plain()
    distshard.load(model, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 earlier.state_dict().values()))


def test_the_hub_layout_asks_transformers_to_revert_only_where_a_key_may_change(monkeypatch):
    # transformers' revert_weight_conversion makes a transform per key (slow for a model of
    # many tensors): where no reverse pattern is in any key its answer is known (every key as
    # it is) and it is not asked; where one is, its answer is the layout
    import transformers.core_model_loading as core
    from transformers import MixtralConfig, MixtralForCausalLM

    from distshard.savelayout import hub_layout

    revert, calls = core.revert_weight_conversion, []
    monkeypatch.setattr(core, "revert_weight_conversion",
                        lambda *a: calls.append(1) or revert(*a))
    small = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}
    for model, asked in ((LlamaForCausalLM(LlamaConfig(**small)), False),
                         (MixtralForCausalLM(MixtralConfig(**small, num_local_experts=3)), True)):
        tensors = dict(model.state_dict())
        calls.clear()
        layout = {s.key: s.shape for s in hub_layout(model, tensors)}
        assert bool(calls) == asked, type(model).__name__
        want = revert(model, {k: torch.empty(t.shape, device="meta") for k, t in tensors.items()})
        assert layout == {k: tuple(t.shape) for k, t in want.items()}, type(model).__name__
        assert asked == (layout.keys() != tensors.keys())  # the experts, one tensor each
