"""``distshard reshard``: any checkpoint distshard reads, rewritten as safetensors of another shard
size, loads bitwise in transformers and distshard; memory stays at a copy buffer; bad input,
the checkpoint's own folder and a non-empty output are refused with exit status 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from checkpoints import CASES, assert_same, empty_model, model_class, reference
from safetensors import safe_open
from safetensors.torch import save_file

import distshard
import distshard.reshard as reshard
from distshard.cli import main
from distshard.shardfiles import COPY_CHUNK, parse_size


def source_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the format's own tools."""
    out = {}
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with safe_open(full, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        elif name.endswith(".bin"):
            out.update(torch.load(full, weights_only=True))
    return out


def weight_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin")))


# case -> (new max shard size, number of files it must give)
RESHARD = {
    "llama": ("200KB", 1),  # 3 safetensors files -> 1, no index
    "llama-single": ("20KB", 7),  # 1 safetensors file -> 7
    "llama-bin": ("60KB", 2),  # 3 .bin files -> 2 safetensors files
    "gpt2-single-bin": ("30KB", 5),  # 1 .bin file -> 5
}


@pytest.mark.parametrize("case", sorted(RESHARD))
def test_reshard_loads_bitwise_with_the_shard_count_asked(checkpoints, tmp_path, capsys, case):
    source, (size, count) = checkpoints[case], RESHARD[case]
    out = str(tmp_path / "out")
    assert main(["reshard", source, out, "--max-shard-size", size, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    files = [f for f in weight_files(out)]
    assert len(files) == count != len(weight_files(source))
    assert sorted(f["name"] for f in result["files"]) == files
    assert all(f["bytes"] == os.path.getsize(os.path.join(out, f["name"])) for f in result["files"])
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json")) == (count > 1)
    assert result["index"] == ("model.safetensors.index.json" if count > 1 else None)
    assert "config.json" in result["copied"] and not [n for n in os.listdir(out) if n[0] == "."]

    want, got = source_tensors(source), source_tensors(out)
    assert sorted(got) == sorted(want) and result["tensors"] == len(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    limit = parse_size(size)
    assert count >= -(-result["tensor_bytes"] // limit)
    for name in files:  # every file within the limit, unless one tensor alone is larger
        with safe_open(os.path.join(out, name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            nbytes = sum(got[k].numel() * got[k].element_size() for k in f.keys())
            assert nbytes <= limit or len(list(f.keys())) == 1, name
    if count > 1:
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        assert sorted(index["weight_map"]) == sorted(want)
        assert index["metadata"]["total_size"] == result["tensor_bytes"] == sum(
            v.numel() * v.element_size() for v in want.values())

    family = CASES[case][0]
    loaded = model_class(family).from_pretrained(out).eval()
    assert_same(loaded, reference(case, source), f"{case}: from_pretrained")
    model = empty_model(family)
    distshard.load(model, out, log_summary=False)
    assert_same(model, reference(case, source), f"{case}: distshard.load")


def test_human_output_names_every_file(checkpoints, tmp_path, capsys):
    assert main(["reshard", checkpoints["llama"], str(tmp_path / "o"), "--max-shard-size",
                 "50000"]) == 0
    text = capsys.readouterr().out
    for name in weight_files(str(tmp_path / "o")):
        assert f"wrote  {name}" in text
    assert "model.safetensors.index.json" in text and "config.json" in text


MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import distshard.reshard as reshard
    from distshard.cli import main

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    reshard.USE_COPY_FILE_RANGE = sys.argv[3] == "kernel"
    with open("/proc/self/clear_refs", "w") as f:  # restart VmHWM from the current RSS
        f.write("5")
    before = status("VmRSS")
    code = main(["reshard", sys.argv[1], sys.argv[2], "--max-shard-size", "30MB", "--json"])
    print(json.dumps(dict(code=code, growth=status("VmHWM") - before)))
""")


@pytest.mark.parametrize("copy", ["kernel", "buffer"])
def test_reshard_memory_stays_at_a_chunk_not_a_shard(tmp_path, copy):
    torch.manual_seed(0)
    source = tmp_path / "big"
    source.mkdir()
    state = {f"layer.{i}.weight": torch.randn(2048, 3200) for i in range(4)}  # 4 x 26 MB
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    size = os.path.getsize(source / "model.safetensors")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(source), str(tmp_path / "out"),
                           copy], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    # the 4 tensors do not fit two to a 30 MB file: 4 files, each a whole shard's worth of bytes
    assert len(weight_files(str(tmp_path / "out"))) == 4
    # a chunk (8 MB), not a tensor (26 MB), a file or the checkpoint (105 MB)
    assert result["growth"] < 2 * COPY_CHUNK < size / 6, (
        f"peak RSS grew {result['growth']} bytes resharding {size} bytes")
    for key, value in source_tensors(str(tmp_path / "out")).items():
        assert torch.equal(value, state[key]), key


def test_bad_input_and_bad_outputs_exit_1_with_the_reason(checkpoints, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    single = os.path.join(checkpoints["llama-single"], "model.safetensors")
    cases = [  # (what the message says, CKPT, OUT)
        ("is not a valid safetensors file", str(bad), str(tmp_path / "o1")),
        ("no checkpoint in folder", str(tmp_path), str(tmp_path / "o2")),
        ("the checkpoint's own folder", checkpoints["llama"], checkpoints["llama"]),
        ("the checkpoint's own folder", single, checkpoints["llama-single"]),  # a file's folder
        ("is not empty", checkpoints["llama"], checkpoints["gpt2"]),
    ]
    before = {p: sorted(os.listdir(p)) for p in (checkpoints["llama"], checkpoints["gpt2"],
                                                 checkpoints["llama-single"])}
    for why, source, out in cases:
        assert main(["reshard", source, out]) == 1, why
        err = capsys.readouterr().err
        assert err.startswith("distshard reshard: failed:") and why in err, (why, err)
        assert main(["reshard", source, out, "--json"]) == 1
        d = json.loads(capsys.readouterr().out)
        assert not d["valid"] and why in d["error"] and d["file"], d
    assert {p: sorted(os.listdir(p)) for p in before} == before
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_a_failure_while_writing_leaves_the_output_empty(checkpoints, tmp_path, capsys,
                                                          monkeypatch):
    calls = []

    def failing(src_fd, offset, count, dst_fd):
        calls.append(count)
        if len(calls) == 12:  # well into the second file
            raise OSError(5, "Input/output error")
        real(src_fd, offset, count, dst_fd)

    real = reshard.copy_range
    monkeypatch.setattr(reshard, "copy_range", failing)
    out = tmp_path / "out"
    assert main(["reshard", checkpoints["llama"], str(out), "--max-shard-size", "20KB"]) == 1
    assert "Input/output error" in capsys.readouterr().err
    assert len(calls) == 12 and os.listdir(out) == []


def test_a_side_file_linked_out_of_the_checkpoint_is_refused_not_copied(checkpoints, tmp_path,
                                                                        capsys):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama"], source)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the checkpoint")
    os.symlink(secret, source / "tokenizer.json")
    out = tmp_path / "out"
    assert main(["reshard", str(source), str(out), "--max-shard-size", "20KB"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "outside the checkpoint folder" in err, err
    assert not out.exists() or os.listdir(out) == []
