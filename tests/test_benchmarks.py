"""The benchmarks keep working: each runs at a tiny size (figures are not asserted: tests never
judge wall-clock time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, tmp_path, *args: str) -> str:
    # (ranks forked from a server that has imported torch: they start faster than new
    # interpreters, and no test reads a time)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path),
               DISTSHARD_BENCH_START_METHOD="forkserver")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_compare_runs_every_mode_and_every_loader_agrees_bitwise(tmp_path):
    # the many-tensor case, replicated and sharded: one run of the harness for both
    out = run("compare.py", tmp_path, "--size", "many-tiny", "--ranks", "2", "--modes",
              "replicated", "sharded", "--loaders", "distshard", "transformers", "dcp",
              "--repeats", "1", "--json", str(tmp_path / "out.json"))
    result = json.loads((tmp_path / "out.json").read_text())
    rows = result["rows"]
    assert [(r["mode"], r["loader"]) for r in rows] == [
        (mode, loader) for mode in ("replicated", "sharded")
        for loader in ("distshard", "transformers", "dcp")], out
    assert len({r["digest"] for r in rows}) == 1, out  # every parameter, bitwise
    assert all(r["times"] == [r["seconds"]] for r in rows), rows
    assert result["tensors"] == 441
    for mine in (rows[0], rows[3]):
        assert mine["plan_bytes"] > 0 and mine["planning_seconds"] > 0, mine
        assert mine["exchange_seconds"] >= 0 and 0 < mine["load_seconds"] <= mine["seconds"], mine
    assert out.count("rank 0 planned in") == 2, out
    assert "the times below are not figures" in out and result["start_method"] == "forkserver"


def test_a_row_is_the_median_run_and_a_failed_run_is_not_hidden():
    sys.path.insert(0, str(BENCHMARKS))
    from harness import median_run

    runs = [{"seconds": s, "n": i} for i, s in enumerate([3.0, 1.0, 2.0, 5.0])]
    assert median_run(runs) == dict(runs[2], times=[3.0, 1.0, 2.0, 5.0])
    assert median_run(runs[:3])["n"] == 2 and median_run(runs[:1])["n"] == 0
    failed = {"error": "boom"}
    assert median_run([runs[0], failed, runs[1]]) is failed


def test_sharded_load_runs_within_its_memory_bound(tmp_path):
    out = run("sharded_load.py", tmp_path, "--size", "tiny", "--ranks", "2", "--repeats", "1")
    assert "every rank within its memory bound" in out


def test_multinode_runs_where_allowed_and_every_loader_agrees(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from multinode import why_not

    reason = why_not()
    if reason:
        pytest.skip(f"S2 needs what this machine does not allow: {reason}")
    # one rank per node: the harness and the cross-node route, at half the processes
    out = run("multinode.py", tmp_path, "--size", "tiny", "--cap-mbps", "400",
              "--ranks-per-node", "1", "--loaders", "distshard", "transformers", "--json",
              str(tmp_path / "s2.json"),
              "--chart", str(tmp_path / "s2.png"))
    if "S2 skipped" in out:
        pytest.skip(out.strip())
    rows = json.loads((tmp_path / "s2.json").read_text())["rows"]
    assert [(r["mode"], r["loader"]) for r in rows] == [
        ("replicated", "distshard"), ("replicated", "transformers"),
        ("sharded", "distshard"), ("sharded", "transformers")], out
    assert len({round(r["checksum"], 3) for r in rows}) == 1, out
    assert (tmp_path / "s2.png").stat().st_size > 0


def test_planning_floor_runs_every_planner_on_every_rank(tmp_path):
    out = run("planning_floor.py", tmp_path, "--size", "many-tiny", "--ranks", "2",
              "--rounds", "1", "--json", str(tmp_path / "out.json"))
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["ranks"], r["planner"]) for r in rows] == [
        (2, "distshard"), (2, "floor"), (2, "floor-bare")], out
    for r in rows:  # every planner matched every tensor of the checkpoint
        assert r["planning_seconds"] > 0 and r["exchange_seconds"] > 0, r
        assert r["plan_bytes"] > 0 and r["tensors"] == 441 and len(r["runs"]) == 1, r
    assert "the times below are not figures" in out
