"""Keys that are not the model's one to one, in one process: a user's ``key_mapping`` for any
module, ``.bin`` checkpoints of fused experts, errors that say what differs and what to pass,
new weights reported as transformers reports them, and quantized checkpoints refused."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

import distshard
from distshard import DistShardError


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])


def _write(path, state: dict[str, torch.Tensor]) -> str:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(path, "model.safetensors"))
    return str(path)


def _meta() -> Net:
    with init_empty_weights():
        return Net()


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Net().state_dict()


def test_key_mapping_renames_checkpoint_keys_for_any_module(tmp_path):
    state = _state()
    renamed = {k.replace("blocks.", "backbone.layer_").replace("norm.weight", "norm.gamma"): v
               for k, v in state.items()}
    path = _write(tmp_path, renamed)
    model = _meta()
    report = distshard.load(model, path, key_mapping={r"^backbone\.layer_": "blocks.",
                                                      r"\.gamma$": ".weight"})
    assert report.missing_keys == [] and report.unexpected_keys == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_strict_errors_name_the_prefix_that_differs_and_what_to_pass(tmp_path):
    path = _write(tmp_path, {"model." + k: v for k, v in _state().items()})
    with pytest.raises(DistShardError) as e:
        distshard.load(_meta(), path)
    text = str(e.value)
    assert "every unexpected key is a missing key with the extra prefix 'model.'" in text
    assert r"key_mapping={'^model\\.': ''}" in text
    # strict=False is suggested where it helps: these missing keys can be initialised
    assert "pass strict=False to initialise the missing keys" in text
    report = distshard.load(_meta(), path, key_mapping={r"^model\.": ""})
    assert report.missing_keys == []
    with pytest.raises(DistShardError, match="key_mapping pattern '\\^nothing' matched no "
                                             "checkpoint key"):
        distshard.load(_meta(), path, key_mapping={"^nothing": ""})


def test_a_transformers_checkpoint_without_its_base_prefix_loads_as_transformers_loads_it(
        tmp_path, caplog):
    """A ``LlamaModel`` checkpoint into ``LlamaForCausalLM``: transformers adds the prefix and
    initialises the new head; distshard too, and warns about the head as transformers does."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(tmp_path)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    with pytest.raises(DistShardError, match=r"missing keys \(1\): lm_head.weight.*strict=False"):
        distshard.load(model, tmp_path)
    caplog.set_level(logging.WARNING, logger="distshard")
    report = distshard.load(model, tmp_path, strict=False)
    assert report.missing_keys == report.initialized_keys == ["lm_head.weight"]
    assert "newly initialized" in caplog.text and "lm_head.weight" in caplog.text
    ref = LlamaForCausalLM.from_pretrained(tmp_path)
    for key, value in ref.state_dict().items():
        if key != "lm_head.weight":
            assert torch.equal(model.state_dict()[key], value), key
    assert 0 < model.lm_head.weight.std() < 0.1  # normal(0, initializer_range=0.02)


def test_fused_experts_from_bin_files(tmp_path):
    """``.bin`` shards of one tensor per expert: each expert read by key, into its box."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                           num_local_experts=3)
    from checkpoints import write_bin_shards
    from safetensors.torch import load_file

    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "st")
    ref = MixtralForCausalLM.from_pretrained(tmp_path / "st")
    hub = load_file(tmp_path / "st" / "model.safetensors")  # one tensor per expert
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in hub
    config.save_pretrained(tmp_path)
    write_bin_shards(hub, str(tmp_path), files=3)
    model = distshard.from_pretrained(MixtralForCausalLM, tmp_path)
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_quantized_checkpoints_are_refused_never_dequantized_wrongly(tmp_path):
    state = _state()
    path = _write(tmp_path / "config", state)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"quantization_config": {"quant_method": "fp8"}}, f)
    with pytest.raises(DistShardError, match=r"quantized \(fp8: 'quantization_config'") as e:
        distshard.load(_meta(), path)
    assert e.value.file == "config.json"
    fp8 = dict(state)
    fp8["blocks.0.proj.weight"] = state["blocks.0.proj.weight"].to(torch.float8_e4m3fn)
    fp8["blocks.0.proj.weight_scale_inv"] = torch.ones(1)
    path = _write(tmp_path / "scales", fp8)
    for strict in (True, False):
        with pytest.raises(DistShardError, match=r"blocks\.0\.proj\.weight.*float8_e4m3fn.*"
                                                 r"without its scales") as e:
            distshard.load(_meta(), path, strict=strict)
        assert e.value.key == "blocks.0.proj.weight"
    with init_empty_weights():  # a model built for that format loads it as it is
        model = Net()
    model.blocks[0].proj.weight = torch.nn.Parameter(
        torch.empty(3, 4, dtype=torch.float8_e4m3fn, device="meta"), requires_grad=False)
    report = distshard.load(model, path, strict=False)
    assert report.unexpected_keys == ["blocks.0.proj.weight_scale_inv"]
    assert torch.equal(model.blocks[0].proj.weight.view(torch.uint8),
                       fp8["blocks.0.proj.weight"].view(torch.uint8))


def _llama(tmp_path, **config):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32, **config)
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(tmp_path)
    return config, LlamaForCausalLM


def test_from_pretrained_refuses_a_quantized_checkpoint_too(tmp_path):
    """Its model is built from the checkpoint's own config, which names the method: that alone
    does not make a model built for the format."""
    _llama(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    from transformers import AutoModelForCausalLM

    with pytest.raises(DistShardError, match=r"quantized \(gptq"):
        distshard.from_pretrained(AutoModelForCausalLM, tmp_path)


def test_a_load_leaves_the_callers_random_state_alone(tmp_path, monkeypatch):
    """New weights come from rank 0's initial seed: no generator is advanced, and no CUDA
    generator is reseeded (torch.manual_seed would reseed them all)."""
    config, cls = _llama(tmp_path)
    reseeded = []
    heads = []
    for _ in range(2):
        torch.manual_seed(5)
        with init_empty_weights():
            model = cls(config)
        with monkeypatch.context() as patch:  # any reseed of a CUDA generator during the load
            patch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
            patch.setattr(torch.cuda, "manual_seed", reseeded.append)
            report = distshard.load(model, tmp_path, strict=False)
        assert report.initialized_keys == ["lm_head.weight"]
        after = torch.rand(4)
        torch.manual_seed(5)
        assert torch.equal(after, torch.rand(4)), "the load advanced the generator"
        heads.append(model.lm_head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and not reseeded


class LlamaWithGate(__import__("transformers").LlamaForCausalLM):
    """A parameter the model's _init_weights does not know: transformers leaves it as memory
    held; distshard makes it 0 on every rank and says so."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.gate = torch.nn.Parameter(torch.ones(3))


def test_new_weights_the_initialisation_does_not_write_are_zero_and_named(tmp_path, caplog):
    config, _ = _llama(tmp_path)
    with init_empty_weights():
        model = LlamaWithGate(config)
    caplog.set_level(logging.WARNING, logger="distshard")
    report = distshard.load(model, tmp_path, strict=False)
    assert report.initialized_keys == ["gate", "lm_head.weight"]
    assert torch.equal(model.gate, torch.zeros(3))
    assert "does not write every element of ['gate']" in caplog.text
    assert not torch.isnan(model.lm_head.weight).any()


def test_an_expert_of_the_wrong_shape_is_named_with_its_file(tmp_path):
    """One tensor per expert, one of them misshapen: the error names that expert and its file,
    and the model stays on meta."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                           num_local_experts=3)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    bad = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    state[bad] = state[bad][:-1]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with init_empty_weights():
        model = MixtralForCausalLM(config)
    with pytest.raises(DistShardError, match=f"{bad.replace('.', '[.]')}' differs from the "
                                             "others in shape") as e:
        distshard.load(model, tmp_path)
    assert e.value.key == bad and e.value.file == "model.safetensors"
    assert all(p.is_meta for p in model.parameters())
