"""distshard.testing, as its users use it: the @distributed decorator, the dist_ranks fixture
(through a user's conftest in a pytest subprocess, where the spawned ranks find the user's
module by its file), a failing and a hanging rank, checkpoints
written by write_checkpoint read back bitwise, and a user's torchrun script under run_torchrun.

This module is imported by every spawned rank of its decorated tests: keep its imports light
(transformers is imported inside the tests that need it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from torch import nn

import distshard
from distshard.testing import RanksFailed, distributed, run_torchrun, write_checkpoint

DEADLINE = 120.0
HANG_DEADLINE = 12.0  # long enough for three ranks to start on a busy 2-core machine


class Tiny(nn.Module):
    """Tied embedding and head, a bias-free layer, a norm and a persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.proj = nn.Linear(16, 24)
        self.inner = nn.Linear(24, 16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 16))


def tiny(seed: int) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # norm weights are not all ones: a mix-up would show
    return model


def meta_tiny() -> Tiny:
    with torch.device("meta"):
        return Tiny()


def assert_state_equal(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[str, str]:
    model = tiny(seed=1)
    torch.save(model.state_dict(), tmp_path / "reference.pt")
    return write_checkpoint(model, tmp_path / "ckpt", max_shard_size="2KB"), str(
        tmp_path / "reference.pt")


# --- @distributed ---------------------------------------------------------------------------

@pytest.mark.multiprocess
@distributed(world_size=2, timeout=DEADLINE)
def test_decorated_test_runs_on_every_rank_with_its_fixtures(rank, world_size, tiny_checkpoint):
    assert (dist.get_rank(), dist.get_world_size()) == (rank, world_size) == (rank, 2)
    path, reference = tiny_checkpoint
    model = meta_tiny()
    report = distshard.load(model, path)
    assert len(report.files_read) > 0 and report.world_size == 2
    assert_state_equal(model, torch.load(reference))
    assert model.head.weight is model.emb.weight
    ranks = torch.tensor([rank])
    dist.all_reduce(ranks)
    assert ranks.item() == 1


@distributed(world_size=3, timeout=HANG_DEADLINE)
def _two_raise_one_hangs(rank, world_size, pid_dir):
    Path(pid_dir, str(rank)).write_text(str(os.getpid()))
    if rank == 0:  # at once: run_ranks connected every rank first, so rank 1 still gets to raise
        raise KeyError("rank 0 lost its key")
    if rank == 1:
        raise ValueError(f"rank {rank} found a bad value")
    time.sleep(3600)


@pytest.mark.multiprocess
def test_every_failing_rank_shows_its_traceback_and_the_deadline_kills_a_hung_rank(tmp_path):
    started = time.monotonic()
    with pytest.raises(RanksFailed) as failed:
        _two_raise_one_hangs(str(tmp_path))
    elapsed = time.monotonic() - started
    errors = failed.value.errors
    assert sorted(errors) == [0, 1, 2], str(failed.value)
    assert "KeyError: 'rank 0 lost its key'" in errors[0]
    assert 'raise ValueError(f"rank {rank} found a bad value")' in errors[1]  # its own frame
    assert "ValueError: rank 1 found a bad value" in errors[1]
    assert "did not finish within 12 s" in errors[2]
    assert "--- rank 1 ---" in str(failed.value)
    assert HANG_DEADLINE <= elapsed < HANG_DEADLINE + 20
    for pid_file in tmp_path.iterdir():
        assert not _alive(int(pid_file.read_text())), f"rank {pid_file.name} still runs"


def _environment(rank, world_size, say=True):
    import tempfile
    if say:
        print(f"rank {rank} writes to the caller's output", flush=True)
    return (os.environ.get("DISTSHARD_TEST_SET"), os.environ.get("DISTSHARD_TEST_GIVEN"),
            os.environ.get("OMP_NUM_THREADS"), tempfile.gettempdir(), os.getcwd())


@pytest.mark.multiprocess
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_ranks_see_the_callers_environment_and_output_as_they_are_at_the_call(tmp_path, monkeypatch, capfd,
                                                                start_method):
    from distshard.testing import run_ranks

    with capfd.disabled():  # a fork server, if any, starts now, outside this test's capture
        run_ranks(_environment, 2, False, start_method=start_method)
    monkeypatch.setenv("DISTSHARD_TEST_SET", "later")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    got = run_ranks(_environment, 2, env={"DISTSHARD_TEST_GIVEN": "given"},
                    start_method=start_method)
    threads = os.environ.get("OMP_NUM_THREADS", "1")  # (a caller's own setting is kept)
    assert got == [("later", "given", threads, str(tmp_path), str(tmp_path))] * 2
    out = capfd.readouterr().out  # (what this test's own capture holds now)
    assert all(f"rank {r} writes to the caller's output" in out for r in range(2)), out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_decorator_refuses_what_spawned_ranks_cannot_import():
    def nested(rank, world_size):
        pass

    with pytest.raises(TypeError, match="module-level"):
        distributed()(nested)
    with pytest.raises(TypeError, match="rank, world_size"):
        distributed()(_one_parameter)


def _one_parameter(rank):
    pass


def test_a_rank_finds_a_decorated_test_by_module_name_or_by_file(tmp_path):
    """What a spawned rank receives is a reference, not the function: pickled, it resolves to
    the undecorated body, by import where the module is importable, else from its file."""
    import pickle

    from distshard.testing import _FunctionRef

    source = tmp_path / "user_tests_by_path.py"
    source.write_text("from distshard.testing import distributed\n\n"
                      "@distributed(world_size=2)\n"
                      "def test_body(rank, world_size, x):\n"
                      "    return ('body', rank, world_size, x)\n")
    spec = importlib.util.spec_from_file_location("user_tests_by_path", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_tests_by_path"] = module
    try:
        spec.loader.exec_module(module)
        ref = pickle.loads(pickle.dumps(_FunctionRef.of(module.test_body.__distshard_body__)))
        assert ref(1, 2, "x") == ("body", 1, 2, "x")  # imported: already in sys.modules
        del sys.modules["user_tests_by_path"]  # as in a fresh process: not on sys.path
        assert ref(0, 2, "y") == ("body", 0, 2, "y")  # loaded from the file
        assert sys.modules["user_tests_by_path"] is not module
    finally:
        sys.modules.pop("user_tests_by_path", None)


# --- the plugin, from a user's conftest -----------------------------------------------------

USER_CONFTEST = 'pytest_plugins = ["distshard.testing"]\n'
USER_TESTS = '''
import torch
import torch.distributed as dist


def body(rank, world_size, base):
    total = torch.tensor([base + rank])
    dist.all_reduce(total)
    return dist.get_rank(), total.item()


def test_fixture(dist_ranks):
    assert dist_ranks(body, 2, 10) == [(0, 21), (1, 21)]
'''


@pytest.mark.multiprocess
def test_user_conftest_enables_the_fixture(tmp_path):
    project = tmp_path / "userproject"  # not the cwd: spawned ranks cannot import it by name
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\ndistshard_timeout = 90\n")
    (project / "conftest.py").write_text(USER_CONFTEST)
    (project / "test_user.py").write_text(USER_TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--import-mode=importlib",
         "-q", str(project)],
        cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE * 2,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert "1 passed" in out and "failed" not in out, out


# --- write_checkpoint ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shard", ["2KB", "1GB"])
def test_write_checkpoint_round_trips_a_plain_module_bitwise(tmp_path, fmt, shard):
    model = tiny(seed=2)
    want = model.state_dict()
    path = Path(write_checkpoint(model, tmp_path, max_shard_size=shard, format=fmt))
    files = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    stored = _read_files(path, files, fmt)
    if shard == "1GB":
        assert files == (["model.safetensors"] if fmt == "safetensors" else ["pytorch_model.bin"])
    else:
        index = json.loads((path / f"{files[0].split('-')[0]}.{fmt}.index.json").read_text())
        assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
        assert index["weight_map"] == {k: f for f in files for k in _read_files(path, [f], fmt)}
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for k, v in want.items() if k != "head.weight")
    # the tie: safetensors keeps one name, a .bin both (as torch.save of the state dict does)
    assert ("head.weight" in stored) == (fmt == "bin") and "emb.weight" in stored
    for key, value in stored.items():
        assert torch.equal(value, want[key]), key
    loaded = meta_tiny()
    distshard.load(loaded, path)
    assert_state_equal(loaded, want)
    assert loaded.head.weight is loaded.emb.weight


def _read_files(path: Path, files: list[str], fmt: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in files:
        out |= (load_file(path / name) if fmt == "safetensors"
                else torch.load(path / name, weights_only=True))
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_write_checkpoint_of_a_transformers_model_reads_back_in_transformers_and_distshard(
        tmp_path, fmt):
    from checkpoints import _configs, assert_same, empty_model

    cls, config = _configs()["gpt2"]  # tied lm_head and wte
    torch.manual_seed(3)
    original = cls(config).eval()
    path = write_checkpoint(original, tmp_path, max_shard_size="40KB", format=fmt)
    assert os.path.exists(os.path.join(path, "config.json"))
    assert any(f.endswith(f".{fmt}.index.json") for f in os.listdir(path))
    assert_same(cls.from_pretrained(path).eval(), original, f"transformers {fmt}")
    model = empty_model("gpt2")
    distshard.load(model, path)
    assert_same(model, original, f"distshard {fmt}")


def test_write_checkpoint_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_checkpoint(tiny(0), tmp_path, format="pickle")
    with pytest.raises(ValueError, match="max_shard_size"):
        write_checkpoint(tiny(0), tmp_path, max_shard_size="40 parsecs")
    with pytest.raises(ValueError, match="meta"):
        write_checkpoint(meta_tiny(), tmp_path)


# --- run_torchrun ---------------------------------------------------------------------------

USER_SCRIPT = '''
"""A user's entrypoint: torchrun --nproc-per-node N train.py --checkpoint DIR --reference FILE"""
import argparse

import torch
import torch.distributed as dist
from torch import nn

import distshard


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--reference", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    with torch.device("meta"):
        model = build()
    report = distshard.load(model, args.checkpoint)
    want = torch.load(args.reference)
    same = all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    print(f"rank {dist.get_rank()}: {len(report.loaded_keys)} tensors, bitwise equal: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''


@pytest.mark.multiprocess
def test_run_torchrun_runs_a_users_script_that_calls_distshard_load(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))  # as the script builds
    torch.save(model.state_dict(), tmp_path / "reference.pt")
    ckpt = write_checkpoint(model, tmp_path / "ckpt", max_shard_size="500B")
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    result = run_torchrun(script, 2, "--checkpoint", ckpt, "--reference",
                          tmp_path / "reference.pt", timeout=DEADLINE)
    assert [out.strip() for out in result.stdout] == [
        f"rank {r}: 4 tensors, bitwise equal: True" for r in range(2)], result


FAILING_SCRIPT = '''
import os, time
rank = int(os.environ["RANK"])
print(f"rank {rank} started", flush=True)
if rank == 1:
    raise ValueError("rank 1 cannot go on")
time.sleep(60)
'''

HANGING_SCRIPT = '''
import os, sys, time
with open(os.path.join(sys.argv[1], os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
time.sleep(3600)
'''


def failed_ranks(tmp_path, text: str) -> dict[int, str]:
    """The errors ``run_torchrun`` raises for a script of ``text`` on two ranks."""
    script = tmp_path / "script.py"
    script.write_text(text)
    with pytest.raises(RanksFailed) as failed:
        run_torchrun(script, 2, timeout=DEADLINE)
    return failed.value.errors


@pytest.mark.multiprocess
def test_run_torchrun_raises_with_the_failing_ranks_traceback(tmp_path):
    errors = failed_ranks(tmp_path, FAILING_SCRIPT)
    assert 1 in errors and "exit code 1" in errors[1], errors
    assert 'raise ValueError("rank 1 cannot go on")' in errors[1]
    assert "ValueError: rank 1 cannot go on" in errors[1] and "rank 1 started" in errors[1]
    assert "ValueError" not in errors.get(0, "")  # rank 0 only got stopped


@pytest.mark.multiprocess
def test_run_torchrun_kills_every_rank_at_the_deadline(tmp_path):
    script = tmp_path / "hangs.py"
    script.write_text(HANGING_SCRIPT)
    started = time.monotonic()
    with pytest.raises(RanksFailed, match="did not finish within 10 s") as failed:
        run_torchrun(script, 2, tmp_path, timeout=10)
    assert time.monotonic() - started < 10 + 15
    assert sorted(failed.value.errors) == [0, 1]
    pids = [int((tmp_path / str(r)).read_text()) for r in range(2)]  # both had started
    assert not any(_alive(pid) for pid in pids)


END_JOB_SCRIPT = '''
import atexit, logging, sys
import torch
import torch.distributed as dist
from distshard.testing import end_job

if sys.argv[1] == "gloo":
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    dist.all_reduce(torch.ones(1))
logging.basicConfig(stream=sys.stderr, format="%(message)s")
logging.getLogger("job").warning("logged")
atexit.register(print, "atexit ran")
print("done, no newline", end="")
end_job(int(sys.argv[3]))
print("not reached")
'''


@pytest.mark.parametrize("group", ["gloo", "none"])
def test_end_job_exits_with_the_code_and_flushes_what_the_rank_wrote(tmp_path, group):
    script = tmp_path / "job.py"
    script.write_text(END_JOB_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), group, str(tmp_path / "rdzv"), "3"],
                          capture_output=True, text=True, timeout=DEADLINE,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "done, no newline"  # flushed; atexit handlers and the rest never ran
    assert "logged" in proc.stderr


ABORTING_SCRIPT = '''
import os, sys, time
if os.environ["RANK"] == "1":
    time.sleep(1)
    print("rank 1 done", flush=True)
    sys.stderr.write("terminate called without an active exception\\n")
    sys.stderr.flush()
    os.abort()
'''


@pytest.mark.multiprocess
def test_run_torchrun_names_a_rank_that_aborted_in_teardown(tmp_path):
    errors = failed_ranks(tmp_path, ABORTING_SCRIPT)
    assert sorted(errors) == [1], errors
    assert "killed by SIGABRT in the interpreter's teardown" in errors[1]
    assert "end_job()" in errors[1] and "rank 1 done" in errors[1]
