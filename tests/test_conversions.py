"""Conversions that are not boxes, and the layout ``distshard.save`` writes.

``TransposedLlama`` is registered with a conversion that transformers runs as an operation: its
checkpoints (written by its own ``save_pretrained``) keep every MLP down projection transposed,
under another name. Loaded on 2 gloo ranks, replicated and under FSDP2, those tensors take the
conversion route (one rank reads the sources whole and runs transformers' operation) and the
model equals transformers' ``from_pretrained``; saved back, the files are what transformers'
``save_pretrained`` writes (the operation reverted). A Mixtral is saved as one tensor per expert,
as ``save_pretrained`` writes it, from a replicated and from an FSDP2 model; one loaded from a
fused checkpoint is saved fused (the conversions a load used are kept, as transformers keeps
them); one loaded with a user's ``key_mapping`` is saved with the checkpoint's own keys; and
FSDP2 models built from their configs, never loaded, are saved with the keys ``save_pretrained``
writes (GPT-NeoX's ``embed_out``, ViT's ``encoder.layer.*``).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import distshard
from distshard.testing import run_ranks

pytestmark = pytest.mark.multiprocess
SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96)


class TransposedLlama(LlamaForCausalLM):
    """A Llama whose checkpoints keep each MLP down projection transposed, as ``weight_t``."""


class TransposedEmbedLlama(LlamaForCausalLM):
    """A tied Llama whose checkpoints keep the embedding transposed (``lm_head.weight``, tied to
    it, is not saved): a tied key whose source is made by a conversion."""


class TwiceTransposedMixtral(MixtralForCausalLM):
    """A Mixtral whose fused gate/up experts are made by Mixtral's own conversion followed by
    two transposes: not a box, so one rank reads every expert tensor of a layer and runs it, and
    save makes 2 x experts tensors from one model tensor by the reverse."""


def _register() -> None:
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        Transpose,
        WeightConverter,
    )

    # Mixtral's own mapping, its gate/up converter replaced by one that transposes twice, under
    # other pattern strings (transformers picks a converter's operations by pattern string: the
    # inner MixtralModel brings Mixtral's converter with the original ones)
    moe = [t for t in get_checkpoint_conversion_mapping("mixtral")
           if not (isinstance(t, WeightConverter) and "gate_up_proj" in t.target_patterns[0])]
    moe.append(WeightConverter(
        source_patterns=["experts.*.w1.weight", "experts.*.w3.weight"],
        target_patterns="experts.gate_up_proj",
        operations=[MergeModulelist(0), Concatenate(1), Transpose(1, 2), Transpose(1, 2)]))
    for name, mapping in (
            ("TransposedLlama", [WeightConverter(
                source_patterns=r"mlp\.down_proj\.weight_t",
                target_patterns="mlp.down_proj.weight", operations=[Transpose(0, 1)])]),
            ("TransposedEmbedLlama", [WeightConverter(
                source_patterns=r"embed_tokens\.weight_t", target_patterns="embed_tokens.weight",
                operations=[Transpose(0, 1)])]),
            ("TwiceTransposedMixtral", moe)):
        try:
            register_checkpoint_conversion_mapping(name, mapping)
        except ValueError:  # registered already in this process
            pass


_register()  # here, and in every spawned rank that imports this module


def files_of(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("conversions")
    torch.manual_seed(0)
    out = {"transposed": str(root / "transposed"), "moe": str(root / "moe"),
           "moe-fused": str(root / "moe-fused")}
    TransposedLlama(LlamaConfig(**SMALL)).save_pretrained(out["transposed"], max_shard_size="40KB")
    moe_config = MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    moe = MixtralForCausalLM(moe_config)
    moe.save_pretrained(out["moe"], max_shard_size="40KB")  # one tensor per expert
    out["moe-twice"] = str(root / "moe-twice")
    TwiceTransposedMixtral(moe_config).save_pretrained(out["moe-twice"], max_shard_size="40KB")
    out["tied"] = str(root / "tied")
    tied = LlamaConfig(**SMALL, tie_word_embeddings=True)
    TransposedEmbedLlama(tied).save_pretrained(out["tied"])
    moe._weight_conversions = []  # as if loaded from a fused checkpoint: saved as it is
    moe.save_pretrained(out["moe-fused"], max_shard_size="40KB")
    for case, cls in CASES:
        out[case + "-resaved"] = str(root / (case + "-resaved"))
        cls.from_pretrained(out[case]).save_pretrained(out[case + "-resaved"])
    # a checkpoint whose keys a user's key_mapping fixes: saved back with the keys it had
    out["renamed"] = str(root / "renamed")
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(out["renamed"])
    state = files_of(out["renamed"])
    os.remove(os.path.join(out["renamed"], "model.safetensors"))
    save_file({k.replace("model.", "transformer.", 1): v for k, v in state.items()},
              os.path.join(out["renamed"], "model.safetensors"), metadata={"format": "pt"})
    out["renamed-resaved"] = str(root / "renamed-resaved")
    LlamaForCausalLM.from_pretrained(out["renamed"], key_mapping=RENAME).save_pretrained(
        out["renamed-resaved"])
    # a model built from its config, never loaded: saved as save_pretrained saves it
    for arch, (config, cls) in FRESH.items():
        out[f"fresh-{arch}"] = str(root / f"fresh-{arch}")
        torch.manual_seed(0)
        cls(config).save_pretrained(out[f"fresh-{arch}"])
    out["root"] = str(root)
    return out


RENAME = {r"^transformer\.": "model."}
CASES = (("transposed", TransposedLlama), ("moe", MixtralForCausalLM),
         ("moe-fused", MixtralForCausalLM), ("moe-twice", TwiceTransposedMixtral))
CONVERTED = {"transposed": lambda k: "down_proj" in k, "moe": lambda k: False,
             "moe-fused": lambda k: False, "moe-twice": lambda k: "gate_up_proj" in k}


def _fresh():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, ViTConfig, ViTModel

    return {"gpt_neox": (GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, vocab_size=96), GPTNeoXForCausalLM),
            "vit": (ViTConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                              num_attention_heads=4, image_size=16, patch_size=8), ViTModel)}


FRESH = _fresh()


def _untied_alias_of_a_conversion(path: str, mesh) -> list[str]:
    """The model sharded before it was tied: ``lm_head.weight`` is read as one more output of
    the embedding's conversion."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import fully_shard

    with init_empty_weights():
        model = TransposedEmbedLlama(LlamaConfig.from_pretrained(path))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = distshard.load(model, path)
    ref = TransposedEmbedLlama.from_pretrained(path)
    bad = [] if "lm_head.weight" in report.converted_keys else [f"{report.converted_keys}"]
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        if not torch.equal(model.get_parameter(key).full_tensor(), ref.get_parameter(key)):
            bad.append(f"{key} differs")
    return bad


def _more(rank: int, world_size: int, folders: dict[str, str], mesh) -> dict[str, list[str]]:
    """Saves after a load that used a key_mapping, and of FSDP2 models never loaded."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    out["untied"] = _untied_alias_of_a_conversion(folders["tied"], mesh)
    model = distshard.from_pretrained(LlamaForCausalLM, folders["renamed"], device_mesh=mesh,
                                      key_mapping=RENAME)
    saved = os.path.join(folders["root"], "renamed-distshard")
    distshard.save(model, saved)
    out["renamed fsdp2"] = [saved]
    for arch, (config, cls) in FRESH.items():
        torch.manual_seed(0)  # the same values on every rank, and as the reference's
        model = cls(config)
        for module in model.modules():
            if type(module).__name__ in (model._no_split_modules or ()):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        saved = os.path.join(folders["root"], f"fresh-{arch}-distshard")
        distshard.save(model, saved)
        out[f"fresh-{arch} fsdp2"] = [saved]
    return out


def _ranks(rank: int, world_size: int, folders: dict[str, str]) -> dict[str, list[str]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    logging.getLogger("transformers").setLevel(logging.ERROR)
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for case, cls in CASES:
        ref = cls.from_pretrained(folders[case])
        for mode, m in (("replicated", None), ("fsdp2", mesh)):
            bad = []
            model, report = distshard.from_pretrained(cls, folders[case], device_mesh=m,
                                                      return_report=True)
            converted = sorted(k for k in report.converted_keys)
            want = sorted(k for k in ref.state_dict() if CONVERTED[case](k))
            if converted != want:
                bad.append(f"converted {converted}, expected {want}")
            for key, value in sorted(ref.state_dict().items()):
                got = model.state_dict()[key]
                got = got.full_tensor() if isinstance(got, DTensor) else got
                if not torch.equal(got, value):
                    bad.append(f"{key} differs")
            saved = os.path.join(folders["root"], f"{case}-{mode}-distshard")
            distshard.save(model, saved, max_shard_size="40KB")
            out[f"{case} {mode}"] = bad + [saved]
    return out | _more(rank, world_size, folders, mesh)


def test_conversions_load_and_save_as_transformers_does(folders):
    results = run_ranks(_ranks, 2, folders, timeout=300)
    untied = [result.pop("untied") for result in results]
    assert untied == [[], []], untied
    problems = {label: r[:-1] for result in results for label, r in result.items() if r[:-1]}
    assert not problems, problems
    for label, result in results[0].items():
        case = label.split()[0]
        theirs = files_of(folders[case if case.startswith("fresh") else case + "-resaved"])
        mine = files_of(result[-1])
        assert sorted(mine) == sorted(theirs), label
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), label
    keys = files_of(results[0]["moe fsdp2"][-1])
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys  # one per expert
    assert "model.layers.0.mlp.experts.gate_up_proj" in files_of(results[0]["moe-fused fsdp2"][-1])
    assert "model.layers.1.mlp.down_proj.weight_t" in files_of(results[0]["transposed fsdp2"][-1])
