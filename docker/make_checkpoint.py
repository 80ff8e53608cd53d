"""Write the job's checkpoint: a small Llama with random weights (seed 0), saved by transformers
``save_pretrained`` in several safetensors shards. Nothing is downloaded.

    python docker/make_checkpoint.py /ckpt/tiny-llama

Idempotent and atomic: an existing checkpoint is kept, and a new one appears under its final
name only once complete, so agents that start early never see half a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def write(path: str) -> None:
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"checkpoint already at {path}", flush=True)
        return
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(partial, max_shard_size="100KB")
    os.replace(partial, path)
    print(f"wrote a random-weight Llama checkpoint to {path}: {sorted(os.listdir(path))}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} CHECKPOINT_DIR")
    write(sys.argv[1])
