"""The reliability figures the README reports: bad inputs tried, faults injected, hangs, silent
corruptions, worst time to fail.

    python benchmarks/reliability.py

Runs the corpus of bad checkpoints and valid edge cases (tests/corpus.py) on 1 rank and on 3
gloo ranks, an exception in each phase on each of 3 ranks, and a killed or stalled rank in each
phase (timeout 3 s). A hang is a group that misses its deadline; a silent corruption is a bad
input that loaded without an error or a valid one that loaded different values; the time to
fail is the slowest rank's, from calling load to its DistShardError.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from corpus import (  # noqa: E402
    CASES,
    SPEC,
    SpecModel,
    make_state,
    run_case,
    write_corpus,
    write_sharded,
)

import distshard  # noqa: E402
from distshard import DistShardError, _faults  # noqa: E402
from distshard.testing import RanksFailed, run_ranks  # noqa: E402

TIMEOUT = 3.0


def _corpus(rank: int, world_size: int, root: str) -> dict:
    return {name: run_case(name, root, rank) for name in CASES}


def _fault(rank: int, world_size: int, path: str, fault: tuple) -> dict:
    _faults.FAULT, _faults.STALL_SECONDS = fault, 2 * TIMEOUT
    model = SpecModel(SPEC)
    started = time.monotonic()
    try:
        distshard.load(model, path, timeout=TIMEOUT, log_summary=False)
        return dict(error=None, seconds=time.monotonic() - started)
    except DistShardError as e:
        return dict(error=str(e), seconds=time.monotonic() - started,
                    unchanged=all(p.is_meta for p in model.parameters()))


def corpus_figures(root: str, world_size: int) -> tuple[int, int, int, float]:
    """(inputs tried, hangs, silent corruptions, worst seconds to fail)."""
    if world_size == 1:
        results = [_corpus(0, 1, root)]
    else:
        try:
            results = run_ranks(_corpus, world_size, root, timeout=300)
        except RanksFailed:
            return len(CASES), 1, 0, float("nan")
    silent, worst = 0, 0.0
    for name, case in CASES.items():
        for r in results:
            outcome = r[name]
            if case.error is None:
                silent += outcome["error"] is None and not outcome["exact"]
            else:
                silent += outcome["error"] is None or not outcome["unchanged"]
                worst = max(worst, outcome["seconds"])
    return len(CASES), 0, silent, worst


def fault_figures(path: str) -> tuple[int, int, int, float]:
    """(faults injected, hangs, silent corruptions, worst seconds for the others to fail)."""
    tried = hangs = silent = 0
    worst = 0.0
    for phase in _faults.PHASES:
        for bad in range(3):
            for action in ("raise", "kill", "stall"):
                tried += 1
                try:
                    results = dict(enumerate(run_ranks(_fault, 3, path, (phase, bad, action),
                                                       timeout=60)))
                except RanksFailed as e:
                    if any("did not finish" in msg for msg in e.errors.values()):
                        hangs += 1
                        continue
                    results = e.results  # the killed rank leaves no result
                for rank, r in results.items():
                    if rank == bad and action != "raise":
                        continue
                    if r["error"] is None or not r["unchanged"]:
                        silent += 1
                    else:
                        worst = max(worst, r["seconds"])
    return tried, hangs, silent, worst


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for world_size in (1, 3):
            root = write_corpus(os.path.join(tmp, f"corpus{world_size}"))
            rows.append((f"bad inputs and edge cases, {world_size} rank(s)", *corpus_figures(root, world_size)))
        path = os.path.join(tmp, "faults")
        write_sharded(path, make_state(), files=3)
        rows.append((f"faults (raise, SIGKILL, stall) x 5 phases x 3 ranks, timeout {TIMEOUT:.0f} s",
                     *fault_figures(path)))
    print(f"{'what':<66} {'tried':>5} {'hangs':>5} {'silent':>6} {'worst s':>8}")
    for what, tried, hangs, silent, worst in rows:
        print(f"{what:<66} {tried:>5} {hangs:>5} {silent:>6} {worst:>8.2f}")
    bad = sum(r[2] + r[3] for r in rows)
    print("no hang, no silent corruption" if not bad else f"{bad} HANGS OR SILENT CORRUPTIONS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
