"""Small random-weight checkpoints written by the tools users have (transformers
``save_pretrained``, safetensors, ``torch.save``), and the single-process references."""

from __future__ import annotations

import json
import os

import torch
from accelerate import init_empty_weights
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from distshard.testing import write_checkpoint

TINY = dict(vocab_size=96)


def _configs():
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32,
                                             bos_token_id=0, eos_token_id=0, **TINY)),
        "llama": (LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, hidden_size=32,
                                                intermediate_size=64, num_attention_heads=4,
                                                num_key_value_heads=2, bos_token_id=0,
                                                eos_token_id=0, **TINY)),
        "bert": (BertModel, BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, max_position_embeddings=32, **TINY)),
    }


# name -> (model family, layout)
CASES = {
    "gpt2": ("gpt2", "sharded-safetensors"),
    "llama": ("llama", "sharded-safetensors"),
    "bert": ("bert", "sharded-safetensors"),
    "llama-bin": ("llama", "sharded-bin"),
    "llama-single": ("llama", "single-safetensors"),
    "gpt2-single-bin": ("gpt2", "single-bin"),
}
SHARD = "40KB"  # several files per model, some buckets span several tensors


def model_class(family: str):
    return _configs()[family][0]


def write_case(name: str, root: str, seed: int = 0) -> str:
    """Write checkpoint ``name`` of CASES under ``root``; return its folder."""
    family, layout = CASES[name]
    cls, config = _configs()[family]
    torch.manual_seed(seed)
    model = cls(config)
    path = os.path.join(root, name)
    if layout == "sharded-bin":  # keys dealt round-robin: every file holds parts of every layer
        config.save_pretrained(path)
        write_bin_shards({k: v.contiguous() for k, v in model.state_dict().items()}, path, files=3)
    else:  # as users' tools write them: save_pretrained, or torch.save of the state dict
        write_checkpoint(model, path, max_shard_size="1GB" if "single" in layout else SHARD,
                         format="bin" if layout.endswith("bin") else "safetensors")
    return path


def write_bin_shards(state: dict[str, torch.Tensor], path: str, files: int) -> None:
    """The Hugging Face ``.bin`` layout: shards named ``pytorch_model-0000i-of-0000n.bin`` and
    ``pytorch_model.bin.index.json``."""
    keys = list(state)
    weight_map = {}
    for i in range(files):
        name = f"pytorch_model-{i + 1:05d}-of-{files:05d}.bin"
        chunk = keys[i::files]
        torch.save({k: state[k] for k in chunk}, os.path.join(path, name))
        weight_map.update({k: name for k in chunk})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def empty_model(family: str):
    """The model as users build it for distshard: parameters on meta, buffers real."""
    cls, config = _configs()[family]
    with init_empty_weights():
        model = cls(config)
    return model.eval()


def reference(name: str, path: str):
    """What transformers' from_pretrained gives in one process."""
    family, _ = CASES[name]
    return model_class(family).from_pretrained(path).eval()


def sample_input() -> torch.Tensor:
    return torch.arange(12).reshape(2, 6) % TINY["vocab_size"]


def assert_same(model, ref, where: str = "") -> None:
    """Every parameter and buffer bitwise equal, and the same output."""
    got = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    want = dict(ref.named_parameters(remove_duplicate=False)) | dict(ref.named_buffers())
    assert sorted(got) == sorted(want), f"{where}: names differ"
    for key, value in want.items():
        assert got[key].device.type != "meta", f"{where}: {key} left on meta"
        assert got[key].dtype == value.dtype, f"{where}: {key} dtype {got[key].dtype} != {value.dtype}"
        assert torch.equal(got[key], value), f"{where}: {key} differs"
    with torch.no_grad():
        out, expected = model(sample_input()), ref(sample_input())
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    expected = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
    assert torch.equal(out, expected), f"{where}: outputs differ"
