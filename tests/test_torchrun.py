"""End to end: the launch examples under the real torchrun, as subprocesses with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
EXAMPLES = Path(__file__).resolve().parent.parent / "launch_examples"
DEADLINE = 300


def torchrun(script: str, nproc: int, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(EXAMPLES / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_demo_on_four_ranks_prints_the_report(checkpoints):
    out = torchrun("demo.py", 4, "--checkpoint", checkpoints["llama"])
    assert "across 4 rank(s)" in out
    assert "on every rank: same" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]


@pytest.mark.parametrize("script,case,expect", [
    ("ddp.py", "gpt2", "one DDP step done"),
    ("fsdp1.py", "llama", "one FSDP1 step done"),
    ("fsdp2.py", "llama", "one FSDP2 step done"),
    ("tensor_parallel.py", "llama", "on every rank: same"),
])
def test_launch_example_runs_under_torchrun(checkpoints, script, case, expect):
    out = torchrun(script, 2, "--checkpoint", checkpoints[case])
    assert expect in out, out


def test_moe_example_reads_only_each_ranks_own_experts(tmp_path):
    """The sample Mixtral-like checkpoint (written by the example with save_pretrained): each of
    2 ranks holds 4 of the 8 experts, read half of the bytes itself, and received none."""
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "moe.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, env=env)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2 and "one FSDP2 step done" in proc.stdout, proc.stdout
    for line in lines:
        assert "experts 4 of 8" in line and "received 0 bytes" in line, line
        read, total = (int(n.replace(",", "")) for n in line.split(" read ")[1].split(" bytes")[0]
                       .split(" of "))
        assert abs(read - total / 2) <= 0.05 * total / 2, line
