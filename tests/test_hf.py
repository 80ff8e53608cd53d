"""``distshard.hf.from_pretrained`` against transformers' own ``from_pretrained``: bitwise equal
parameters and buffers, ties kept, eval mode; replicated and FSDP2 on 2 gloo ranks, and in one
process without a process group."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from checkpoints import assert_same

from distshard import DistShardError
from distshard.hf import from_pretrained
from distshard.testing import run_ranks

DEADLINE = 180

# case -> (class passed to from_pretrained, class of the transformers reference)
CLASSES = {
    "llama": ("AutoModelForCausalLM", "AutoModelForCausalLM"),
    "gpt2": ("AutoModelForCausalLM", "AutoModelForCausalLM"),
    "bert": ("BertModel", "BertModel"),
    "llama-bf16": ("LlamaForCausalLM", "AutoModelForCausalLM"),
}


@pytest.fixture(scope="module")
def cases(checkpoints, tmp_path_factory) -> dict[str, str]:
    """The shared checkpoints, plus a bfloat16 Llama (config dtype bfloat16) to check that the
    dtype follows the config as transformers' default ``dtype="auto"`` does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(1)
    bf16 = str(root / "llama-bf16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(bf16, max_shard_size="20KB")
    return {name: checkpoints[name] for name in ("llama", "gpt2", "bert")} | {"llama-bf16": bf16}


def _cls(name: str):
    import transformers

    return getattr(transformers, name)


def _reference(case: str, path: str, **kwargs):
    return _cls(CLASSES[case][1]).from_pretrained(path, **kwargs)


def _check_ties(model, ref, where: str) -> None:
    out, ref_out = model.get_output_embeddings(), ref.get_output_embeddings()
    if ref_out is None:
        return
    ref_tied = ref_out.weight is ref.get_input_embeddings().weight
    tied = out.weight is model.get_input_embeddings().weight
    assert tied == ref_tied, f"{where}: tied={tied}, transformers: {ref_tied}"


def _replicated(rank: int, world_size: int, cases: dict[str, str]) -> list[str]:
    seen = []
    for case, path in cases.items():
        where = f"rank {rank} {case}"
        model, report = from_pretrained(_cls(CLASSES[case][0]), path, return_report=True)
        ref = _reference(case, path)
        assert not model.training, f"{where}: not in eval mode"
        assert report.world_size == world_size and report.missing_keys == []
        assert_same(model, ref, where)
        _check_ties(model, ref, where)
        seen.append(f"{case}:{model.dtype}:{report.bytes_read}")
    return seen


def _fsdp2(rank: int, world_size: int, cases: dict[str, str]) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def per_layer(model, mesh):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    mesh = init_device_mesh("cpu", (world_size,))
    seen = []
    # explicit callback, and the default (fsdp2_by_layer) when only the mesh is given
    for case, shard in (("llama", per_layer), ("llama-bf16", None), ("gpt2", None)):
        where = f"rank {rank} {case} fsdp2"
        path = cases[case]
        model = from_pretrained(_cls(CLASSES[case][0]), path, device_mesh=mesh, shard=shard)
        ref = _reference(case, path)
        assert not model.training, f"{where}: not in eval mode"
        want = dict(ref.named_parameters()) | dict(ref.named_buffers())
        got = dict(model.named_parameters()) | dict(model.named_buffers())
        assert sorted(got) == sorted(want), f"{where}: names differ"
        sharded = 0
        for key in sorted(want):  # the same order on every rank: full_tensor is a collective
            value = got[key]
            if isinstance(value, DTensor):
                sharded += 1
                local = value.to_local()
                assert local.numel() < value.numel(), f"{where}: {key} not sharded"
                value = value.full_tensor()
            assert value.dtype == want[key].dtype, f"{where}: {key} {value.dtype}"
            assert torch.equal(value, want[key]), f"{where}: {key} differs"
        assert sharded > 0, f"{where}: no DTensor parameters"
        _check_ties(model, ref, where)
        seen.append(f"{case}:{sharded}")
    return seen


def _missing_config_on_one_rank(rank: int, world_size: int, path: str, broken: str) -> str:
    """Rank 1 points at a copy without config.json: every rank must raise, none may hang."""
    from transformers import AutoModelForCausalLM

    try:
        from_pretrained(AutoModelForCausalLM, broken if rank == 1 else path, timeout=60)
    except DistShardError as e:
        return str(e)
    raise AssertionError(f"rank {rank}: no error")


def _two_ranks(rank: int, world_size: int, cases: dict[str, str], broken: str) -> dict:
    return {"replicated": _replicated(rank, world_size, cases),
            "fsdp2": _fsdp2(rank, world_size, cases),
            "error": _missing_config_on_one_rank(rank, world_size, cases["llama"], broken)}


def _without_config(path: str, where: str) -> str:
    shutil.copytree(path, where)
    os.remove(os.path.join(where, "config.json"))
    return where


@pytest.mark.multiprocess
def test_two_ranks_equal_transformers(cases, tmp_path):
    """One spawn for all: replicated (Auto and concrete classes, fp32 and bf16), FSDP2 (explicit
    callback and default) and an error on one rank only."""
    broken = _without_config(cases["llama"], str(tmp_path / "no-config"))
    results = run_ranks(_two_ranks, 2, cases, broken, timeout=DEADLINE)
    for rank, result in enumerate(results):
        dtypes = {entry.split(":")[0]: entry.split(":")[1] for entry in result["replicated"]}
        assert dtypes == {"llama": "torch.float32", "gpt2": "torch.float32",
                          "bert": "torch.float32", "llama-bf16": "torch.bfloat16"}, rank
        assert [entry.split(":")[0] for entry in result["fsdp2"]] == ["llama", "llama-bf16", "gpt2"]
        assert "no config.json" in result["error"] and "rank(s) 1" in result["error"], result["error"]
    # each rank read its own share of the checkpoint, not the whole of it
    for r0, r1 in zip(results[0]["replicated"], results[1]["replicated"]):
        assert int(r0.split(":")[2]) > 0 and int(r1.split(":")[2]) > 0, (r0, r1)


def test_one_process_without_process_group(cases):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    assert not dist.is_initialized()
    for case in ("llama", "bert", "llama-bf16"):
        model = from_pretrained(_cls(CLASSES[case][0]), cases[case])
        ref = _reference(case, cases[case])
        assert not model.training
        assert_same(model, ref, case)
        _check_ties(model, ref, case)
    # an explicit dtype overrides the config's, as in transformers
    model = from_pretrained(AutoModelForCausalLM, cases["llama-bf16"], dtype=torch.float32)
    ref = _reference("llama-bf16", cases["llama-bf16"], dtype=torch.float32)
    assert model.dtype == torch.float32
    assert_same(model, ref, "llama-bf16 as float32")
    # the path of the index file works as well as its folder
    index = os.path.join(cases["llama"], "model.safetensors.index.json")
    assert_same(from_pretrained(AutoModelForCausalLM, index), _reference("llama", cases["llama"]),
                "index path")


def test_dtype_from_weights_when_config_has_none(cases, tmp_path):
    """transformers' "auto": no dtype in config.json -> the checkpoint's floating dtype."""
    from transformers import AutoModelForCausalLM

    path = str(tmp_path / "no-dtype")
    shutil.copytree(cases["llama-bf16"], path)
    _drop_config_dtype(path)
    model = from_pretrained(AutoModelForCausalLM, path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == ref.dtype == torch.bfloat16
    assert_same(model, ref, "no dtype in config")


def _drop_config_dtype(path: str) -> None:
    import json

    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    with open(config_file, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("where", ["weights", "index"])
def test_dtype_auto_reads_the_checkpoint_as_transformers_does(tmp_path, where):
    """No dtype in config.json: transformers takes the index's metadata dtype, else the first
    floating tensor in name order (safe_open's), not in the file's data order."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    state = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(config).state_dict().items()}
    # first in the data (the writer sorts by dtype size), last by name: a float32 tensor
    state["model.norm.weight"] = state["model.norm.weight"].float() + 0.123456789
    path = str(tmp_path / where)
    os.makedirs(path)
    if where == "weights":
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:  # sharded, the index naming the dtype; the first file alone would say bfloat16
        names = sorted(state)
        half = {k: state[k] for k in names[:len(names) // 2]}
        rest = {k: state[k] for k in names[len(names) // 2:]}
        files = {"model-00001-of-00002.safetensors": half, "model-00002-of-00002.safetensors": rest}
        for name, part in files.items():
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map = {k: name for name, part in files.items() for k in part}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"dtype": "float16"}, "weight_map": weight_map}, f)
    config.save_pretrained(path)
    _drop_config_dtype(path)
    model = from_pretrained(AutoModelForCausalLM, path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == ref.dtype == {"weights": torch.bfloat16, "index": torch.float16}[where]
    got, want = model.state_dict(), ref.state_dict()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def test_missing_config_is_a_clear_error(cases, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = _without_config(cases["llama"], str(tmp_path / "no-config"))
    with pytest.raises(DistShardError, match="no config.json") as info:
        from_pretrained(AutoModelForCausalLM, broken)
    assert info.value.file == os.path.join(broken, "config.json")
    with pytest.raises(DistShardError, match="never downloads"):
        from_pretrained(AutoModelForCausalLM, "some-org/some-model-that-is-not-a-folder")
    with pytest.raises(DistShardError, match="dtype"):
        from_pretrained(AutoModelForCausalLM, cases["llama"], dtype="int8")
