"""A zoo of transformers architectures with tiny random configs, written by ``save_pretrained``
as users' checkpoints are (transformers writes the hub layout: one tensor per expert, the old
key names), to be loaded as the matching Auto class loads them.

Dense decoders, mixture-of-experts decoders, encoders, encoder-decoders, vision and multimodal
models; some whose checkpoints are kept in another layout than their modules (fused experts,
renamed modules, a fused qkv or gate/up split by slices, a transposed expert layout).
"""

from __future__ import annotations

import os

import torch

_BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             vocab_size=96)
_DEC = dict(_BASE, num_key_value_heads=2, max_position_embeddings=64)
_MOE = dict(_DEC, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16)
_VISION = dict(_BASE, image_size=16, patch_size=8)
_ENC = dict(_BASE, max_position_embeddings=64)

# name -> (model_type, Auto class, config keywords)
ZOO: dict[str, tuple[str, str, dict]] = {
    # dense decoders
    "llama": ("llama", "AutoModelForCausalLM", _DEC),
    "mistral": ("mistral", "AutoModelForCausalLM", _DEC),
    "qwen2": ("qwen2", "AutoModelForCausalLM", _DEC),
    "qwen3": ("qwen3", "AutoModelForCausalLM", dict(_DEC, head_dim=8)),
    "gemma": ("gemma", "AutoModelForCausalLM", dict(_DEC, head_dim=8)),
    "gemma2": ("gemma2", "AutoModelForCausalLM", dict(_DEC, head_dim=8)),
    "phi3": ("phi3", "AutoModelForCausalLM", dict(_DEC, pad_token_id=0)),
    "gpt2": ("gpt2", "AutoModelForCausalLM",
             dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=96)),
    "gpt_neox": ("gpt_neox", "AutoModelForCausalLM", dict(_BASE, max_position_embeddings=64)),
    "falcon": ("falcon", "AutoModelForCausalLM", _BASE),
    "opt": ("opt", "AutoModelForCausalLM",
            dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                 vocab_size=96, word_embed_proj_dim=32, max_position_embeddings=64)),
    "bloom": ("bloom", "AutoModelForCausalLM", dict(n_layer=2, hidden_size=32, n_head=4,
                                                    vocab_size=96)),
    "starcoder2": ("starcoder2", "AutoModelForCausalLM", _DEC),
    "olmo2": ("olmo2", "AutoModelForCausalLM", _DEC),
    # mixture of experts
    "mixtral": ("mixtral", "AutoModelForCausalLM", _MOE),
    "qwen2_moe": ("qwen2_moe", "AutoModelForCausalLM",
                  dict(_MOE, shared_expert_intermediate_size=32)),
    "qwen3_moe": ("qwen3_moe", "AutoModelForCausalLM", dict(_MOE, head_dim=8)),
    "olmoe": ("olmoe", "AutoModelForCausalLM", _MOE),
    "deepseek_v3": ("deepseek_v3", "AutoModelForCausalLM",
                    dict(_MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                         q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
    "granitemoe": ("granitemoe", "AutoModelForCausalLM", _MOE),
    "phimoe": ("phimoe", "AutoModelForCausalLM", _MOE),
    "jamba": ("jamba", "AutoModelForCausalLM",
              dict(_MOE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, mamba_d_state=4, mamba_expand=2)),
    # encoders
    "bert": ("bert", "AutoModel", _ENC),
    "roberta": ("roberta", "AutoModelForMaskedLM", _ENC),
    "distilbert": ("distilbert", "AutoModel",
                   dict(n_layers=2, dim=32, hidden_dim=64, n_heads=4, vocab_size=96,
                        max_position_embeddings=64)),
    "electra": ("electra", "AutoModel", dict(_ENC, embedding_size=16)),
    "albert": ("albert", "AutoModel", dict(_ENC, embedding_size=16)),
    "deberta-v2": ("deberta-v2", "AutoModel", _ENC),
    "nomic_bert": ("nomic_bert", "AutoModel", _ENC),  # fused Wqkv, cut in three
    "gte": ("gte", "AutoModel", _ENC),  # fused qkv and up/gate, cut by slices
    # encoder-decoders
    "t5": ("t5", "AutoModelForSeq2SeqLM",
           dict(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=96)),
    "bart": ("bart", "AutoModelForSeq2SeqLM",
             dict(encoder_layers=2, decoder_layers=2, d_model=32, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                  vocab_size=96, max_position_embeddings=64)),
    # vision
    "vit": ("vit", "AutoModel", _VISION),
    "dinov2": ("dinov2", "AutoModel", _VISION),
    "dinov2-swiglu": ("dinov2", "AutoModel", dict(_VISION, use_swiglu_ffn=True)),
    # multimodal
    "clip": ("clip", "AutoModel",
             dict(text_config=_ENC, vision_config=_VISION, projection_dim=16)),
    "llava": ("llava", "AutoModelForImageTextToText",
              dict(text_config=dict(_DEC, model_type="llama"), image_token_index=95,
                   vision_config=dict(_VISION, model_type="clip_vision_model",
                                      projection_dim=16))),
    "gemma3": ("gemma3", "AutoModelForImageTextToText",
               dict(text_config=dict(_DEC, head_dim=8, model_type="gemma3_text"),
                    vision_config=dict(_VISION, model_type="siglip_vision_model"),
                    mm_tokens_per_image=4, image_token_index=95)),
    "qwen3_vl_moe": ("qwen3_vl_moe", "AutoModelForImageTextToText",  # transposed experts
                     dict(text_config=dict(_MOE, head_dim=8, moe_intermediate_size=24,
                                           rope_scaling={"rope_type": "default",
                                                         "mrope_section": [2, 1, 1]}),
                          vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                             num_heads=4, out_hidden_size=32, patch_size=8,
                                             spatial_merge_size=1, temporal_patch_size=1,
                                             deepstack_visual_indexes=[0]))),
}


def auto_class(name: str):
    import transformers

    return getattr(transformers, ZOO[name][1])


def write_zoo(root: str, names=None, seed: int = 0) -> dict[str, str]:
    """Write each architecture's checkpoint with ``save_pretrained`` (several files each);
    return name -> folder."""
    from transformers import AutoConfig

    out = {}
    for name in names or ZOO:
        model_type, _, kwargs = ZOO[name]
        config = AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(seed)
        model = auto_class(name).from_config(config)
        out[name] = os.path.join(root, name)
        model.save_pretrained(out[name], max_shard_size="40KB")
    return out


def transpose_experts(src: str, dst: str) -> str:
    """A copy of a Qwen3-VL-MoE checkpoint in the layout its hub checkpoints keep: the fused
    expert tensors transposed in their last two dimensions (transformers transposes them back
    on load: an operation, not a box)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    for name in files:
        path = os.path.join(dst, name)
        state = load_file(path)
        state = {k: v.transpose(1, 2).contiguous() if ".experts." in k else v
                 for k, v in state.items()}
        save_file(state, path, metadata={"format": "pt"})
    return dst
