"""What the launch examples share: process-group set-up, a sample sharded Hugging Face checkpoint
(a Llama-like model with random weights, written by transformers ``save_pretrained``; nothing is
downloaded), and the model built on the meta device."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

SIZES = {  # name -> (hidden, layers, vocab): roughly 8 MB, 120 MB, 850 MB in fp32
    "tiny": (128, 2, 2048),
    "small": (512, 8, 16384),
    "large": (1024, 16, 32000),
    # Mixtral-like, 8 experts of 2 x hidden each: roughly 2.2 MB and 0.71 GB in fp32
    "moe-tiny": (64, 2, 1024),
    "moe": (640, 8, 8192),
}
EXPERTS = 8


def write_sample(path: str, size: str = "small", max_shard_size: str = "20MB") -> str:
    """A sample checkpoint written by ``save_pretrained``: a Llama-like model, or for the
    ``moe`` sizes a Mixtral-like one, which transformers saves as one tensor per expert."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    hidden, layers, vocab = SIZES[size]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    if size.startswith("moe"):
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=hidden * 2,
                                                 num_local_experts=EXPERTS,
                                                 num_experts_per_tok=2, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=hidden * 3, **common))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def ensure_checkpoint(path: str | None, size: str = "small") -> str:
    """Collective: rank 0 writes the sample checkpoint unless ``path`` is given; every rank
    returns the same path."""
    if path:
        return path
    family = "mixtral" if size.startswith("moe") else "llama"
    path = os.path.join(tempfile.gettempdir(), f"distshard-sample-{family}-{size}")
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(path, "config.json")):
        print(f"writing a sample {size} checkpoint to {path} ...", flush=True)
        shutil.rmtree(path + ".partial", ignore_errors=True)
        write_sample(path + ".partial", size)
        os.replace(path + ".partial", path)  # the folder appears complete or not at all
    dist.barrier()
    return path


def start(description: str, default_size: str = "tiny") -> tuple[torch.device, str]:
    """Parse --checkpoint/--size, join the torchrun job (nccl on GPUs, else gloo), and return
    this rank's device and the checkpoint path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", help="checkpoint folder or file (default: a sample)")
    parser.add_argument("--size", choices=sorted(SIZES), default=default_size,
                        help="size of the sample checkpoint written when none is given")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device, ensure_checkpoint(args.checkpoint, args.size)


def meta_model(ckpt: str) -> torch.nn.Module:
    """The model of ``ckpt``'s config with parameters on meta (buffers real), ties in place."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    model.tie_weights()  # before any sharding, so that FSDP and TP see tied weights
    return model


def train_step(model: torch.nn.Module, vocab_size: int, device: torch.device) -> float:
    """One optimizer step on random tokens; returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab_size, (2, 16), device=device,
                           generator=torch.Generator(device).manual_seed(dist.get_rank()))
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    return loss.item()
