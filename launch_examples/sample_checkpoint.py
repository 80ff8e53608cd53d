"""A sample sharded Hugging Face checkpoint for the examples: a Llama-like model with random
weights, written by transformers ``save_pretrained`` (nothing is downloaded)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

SIZES = {  # name -> (hidden, layers, vocab): roughly 8 MB, 120 MB, 850 MB in fp32
    "tiny": (128, 2, 2048),
    "small": (512, 8, 16384),
    "large": (1024, 16, 32000),
}


def write_sample(path: str, size: str = "small", max_shard_size: str = "20MB") -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab,
                         bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size=max_shard_size)
    return path


def ensure_checkpoint(path: str | None, size: str = "small") -> str:
    """Collective: rank 0 writes the sample checkpoint unless ``path`` is given; every rank
    returns the same path."""
    if path:
        return path
    path = os.path.join(tempfile.gettempdir(), f"distshard-sample-llama-{size}")
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        print(f"writing a sample {size} checkpoint to {path} ...", flush=True)
        write_sample(path + ".partial", size)
        os.replace(path + ".partial", path)
    dist.barrier()
    return path
