"""Test-only fault injection: make one rank fail, die or stall in one phase of a load.

Set ``FAULT = ("read", 1)`` (raise), ``("read", 1, "kill")`` (SIGKILL itself) or
``("read", 1, "stall")`` (sleep ``STALL_SECONDS``) in a test, or ``FAULT = callable(phase, rank)``
to run any code there; or ``DISTSHARD_INJECT_FAULT=read:1[:kill|stall]`` in the environment of a
torchrun job. Phases of a load: validate, plan, read, distribute, materialize; of a save: write.
Never set in production.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

__all__ = ["FAULT", "PHASES", "STALL_SECONDS", "check"]

PHASES = ("validate", "plan", "read", "distribute", "materialize")  # of a load
FAULT: tuple | Callable[[str, int], None] | None = None
STALL_SECONDS = 60.0


def check(phase: str, rank: int) -> None:
    fault = FAULT
    if fault is None and (env := os.environ.get("DISTSHARD_INJECT_FAULT")):
        name, target, *action = env.split(":")
        fault = (name, int(target), *action)
    if fault is None:
        return
    if callable(fault):
        fault(phase, rank)
        return
    name, target, action = (*fault, "raise")[:3]
    if (name, target) != (phase, rank):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stall":
        time.sleep(STALL_SECONDS)
    else:
        raise RuntimeError(f"injected fault in phase {phase!r} on rank {rank}")
