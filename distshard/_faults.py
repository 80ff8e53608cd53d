"""Test-only fault injection: make one rank fail in one phase of a load.

Set ``FAULT = ("read", 1)`` in a test, or ``DISTSHARD_INJECT_FAULT=read:1`` in the environment of
a torchrun job. Phases: validate, plan, read, distribute, materialize. Never set in production.
"""

from __future__ import annotations

import os

__all__ = ["FAULT", "PHASES", "check"]

PHASES = ("validate", "plan", "read", "distribute", "materialize")
FAULT: tuple[str, int] | None = None


def check(phase: str, rank: int) -> None:
    fault = FAULT
    if fault is None and (env := os.environ.get("DISTSHARD_INJECT_FAULT")):
        name, _, target = env.partition(":")
        fault = (name, int(target))
    if fault is not None and fault == (phase, rank):
        raise RuntimeError(f"injected fault in phase {phase!r} on rank {rank}")
