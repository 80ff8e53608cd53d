"""The command line: inspect, plan and verify, for people and (``--json``) for programs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from corpus import CASES as BAD
from corpus import slug, write_corpus
from safetensors import safe_open

from distshard.cli import main


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _header_keys(folder: str) -> dict[str, tuple]:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for key in f.keys():
                    out[key] = tuple(f.get_slice(key).get_shape())
    return out


@pytest.mark.parametrize("case", ["llama", "gpt2", "llama-single", "llama-bin", "gpt2-single-bin"])
def test_inspect_reports_what_the_files_hold(checkpoints, capsys, case):
    code, d = run_json(capsys, "inspect", checkpoints[case])
    assert code == 0 and d["valid"] and d["consistent"]
    assert d["format"] == ("bin" if "bin" in case else "safetensors")
    assert d["layout"] == ("single file" if "single" in case else "sharded")
    files = sorted(f for f in os.listdir(checkpoints[case]) if f.endswith((".bin", ".safetensors")))
    assert sorted(f["name"] for f in d["files"]) == files
    assert d["file_bytes"] == sum(os.path.getsize(os.path.join(checkpoints[case], f)) for f in files)
    if d["format"] == "safetensors":
        shapes = _header_keys(checkpoints[case])
        assert d["tensors"] == len(shapes)
        largest = max(shapes.items(), key=lambda kv: kv[1][0] * (kv[1][1] if len(kv[1]) > 1 else 1))
        assert tuple(d["largest"]["shape"]) == largest[1]
    assert main(["inspect", checkpoints[case]]) == 0
    assert "consistent" in capsys.readouterr().out


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


# The corpus cases that are wrong in themselves (not only against some model).
STRUCTURAL = [n for n, c in BAD.items() if c.error and c.file and c.after_plan is None
              and "mismatch" not in c.error and "keys" not in c.error]


@pytest.mark.parametrize("name", STRUCTURAL)
def test_inspect_and_verify_refuse_a_bad_checkpoint_with_the_reason(corpus_root, capsys, name):
    case = BAD[name]
    path = os.path.join(corpus_root, slug(name))
    for command in ("inspect", "verify"):
        code, d = run_json(capsys, command, path)
        assert code == 1 and not d["valid"], d
        assert case.file in d["error"] or repr(case.file) in d["error"], d  # repr: a NUL
        assert d["file"] is not None, d
        assert main([command, path]) == 1
        assert "invalid checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("world_size,nodes", [(1, 1), (4, 2), (6, 3)])
def test_plan_reads_every_byte_once_balanced_by_bytes(checkpoints, capsys, world_size, nodes):
    _, info = run_json(capsys, "inspect", checkpoints["llama"])
    code, d = run_json(capsys, "plan", checkpoints["llama"], "--world-size", str(world_size),
                       "--nodes", str(nodes), "--bucket-size", "8192")
    assert code == 0
    reads = [r["read_bytes"] for r in d["ranks"]]
    assert sum(reads) == d["total_bytes"] == info["tensor_bytes"]
    assert sum(d["node_read_bytes"]) == d["total_bytes"] and len(d["node_read_bytes"]) == nodes
    assert max(reads) <= d["total_bytes"] / world_size + d["bucket_bytes"]
    assert d["sharded"]["holds_per_rank"] * world_size >= d["total_bytes"]


def test_plan_with_node_locality_reads_the_checkpoint_once_per_node(checkpoints, capsys):
    code, d = run_json(capsys, "plan", checkpoints["llama"], "--world-size", "6", "--nodes", "3",
                       "--bucket-size", "8192", "--locality", "node")
    assert code == 0 and d["locality"] == "node"
    assert d["node_read_bytes"] == [d["total_bytes"]] * 3
    assert d["job_read_bytes"] == 3 * d["total_bytes"]
    for node in range(3):  # each node's own ranks share its reads, balanced
        reads = [r["read_bytes"] for r in d["ranks"] if r["node"] == node]
        assert max(reads) <= d["total_bytes"] / 2 + d["bucket_bytes"]


@pytest.mark.parametrize("args,why", [
    (["--world-size", "3", "--nodes", "2"], "must be a multiple of --nodes"),
    (["--world-size", "0"], "--world-size: 0 is not positive"),
    (["--world-size", "2", "--bucket-size", "0"], "--bucket-size: 0 is not positive"),
    (["--world-size", "2", "--nodes", "x"], "--nodes: 'x' is not a whole number"),
])
def test_plan_refuses_bad_usage_with_status_2(checkpoints, capsys, args, why):
    with pytest.raises(SystemExit) as exited:  # argparse's status for bad usage, as documented
        main(["plan", checkpoints["llama"], *args, "--json"])
    assert exited.value.code == 2 and why in capsys.readouterr().err


def test_verify_hashes_every_file(checkpoints, capsys):
    folder = checkpoints["llama"]
    code, d = run_json(capsys, "verify", "--hash", folder)
    assert code == 0
    for f in d["files"]:
        with open(os.path.join(folder, f["name"]), "rb") as fh:
            assert f["sha256"] == hashlib.sha256(fh.read()).hexdigest()


def test_verify_hash_of_a_file_that_cannot_be_read_exits_1_naming_it(checkpoints, capsys,
                                                                      monkeypatch):
    import distshard.cli

    def unreadable(path, *args, **kwargs):  # removed or unreadable since it was described
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(distshard.cli, "open", unreadable, raising=False)
    code, d = run_json(capsys, "verify", "--hash", checkpoints["llama"])
    assert code == 1 and not d["valid"] and "cannot hash" in d["error"], d
    assert d["file"].startswith("model-") and "Permission denied" in d["error"], d


def test_console_script_and_module_entry_points(checkpoints):
    commands = [[sys.executable, "-m", "distshard"]]
    script = shutil.which("distshard", path=os.path.dirname(sys.executable))
    assert script, "the distshard console script is not installed beside this python"
    commands.append([script])
    for command in commands:
        proc = subprocess.run([*command, "inspect", checkpoints["gpt2"], "--json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["format"] == "safetensors"


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> str:
    """A Mixtral checkpoint as save_pretrained writes it: one tensor per expert."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    path = str(tmp_path_factory.mktemp("moe") / "mixtral")
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                     num_local_experts=3)).save_pretrained(path)
    return path


def test_inspect_and_plan_show_the_checkpoint_tensors_that_form_each_model_tensor(moe, capsys):
    code, d = run_json(capsys, "inspect", moe)
    m = d["mapping"]
    assert code == 0 and m["model"] == "MixtralForCausalLM" and not m["missing"]
    fused = m["tensors"]["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused["kind"] == "boxes" and fused["sources"] == [
        f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3")
        for e in range(3)]
    assert m["tensors"]["model.layers.0.mlp.gate.weight"] == dict(
        kind="renamed", sources=["model.layers.0.block_sparse_moe.gate.weight"])
    assert m["tensors"]["model.norm.weight"]["kind"] == "same"
    code, plan = run_json(capsys, "plan", moe, "--world-size", "2")
    assert code == 0 and plan["mapping"] == m and plan["job_read_bytes"] == d["tensor_bytes"]
    assert main(["inspect", moe]) == 0
    out = capsys.readouterr().out
    assert "mapping     onto MixtralForCausalLM" in out
    assert "model.layers.0.mlp.experts.down_proj <- " in out and "[boxes]" in out
    code, d = run_json(capsys, "inspect", moe, "--model", "none")
    assert d["mapping"] == dict(model=None, why="--model none")
    code, d = run_json(capsys, "inspect", moe, "--model", "NoSuchModel")
    assert code == 1 and "NoSuchModel" in d["error"]


def test_a_config_json_that_is_no_transformers_config_gives_no_mapping(checkpoints, tmp_path,
                                                                        capsys):
    path = shutil.copytree(checkpoints["llama"], tmp_path / "other")
    (path / "config.json").write_text(json.dumps({"hidden": 32, "note": "not transformers'"}))
    code, d = run_json(capsys, "inspect", str(path))
    assert code == 0 and d["mapping"]["model"] is None, d
    assert "not a transformers model's config" in d["mapping"]["why"]
    code, d = run_json(capsys, "inspect", str(path), "--model", "LlamaForCausalLM")
    assert code == 1 and "cannot build LlamaForCausalLM" in d["error"], d
