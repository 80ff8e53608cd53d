"""A user's own torchrun script, run with a deadline (see :mod:`distshard.testing`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil
import torch.distributed as dist

from .ranks import RanksFailed

__all__ = ["TorchrunResult", "end_job", "run_torchrun"]


@dataclass(frozen=True, slots=True)
class TorchrunResult:
    """What each rank of a torchrun job wrote (index = rank), and torchrun's own output."""

    stdout: list[str]
    stderr: list[str]
    launcher: str


def run_torchrun(script: str | os.PathLike, nproc: int, *args: Any, timeout: float = 300.0,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 torchrun_args: tuple[str, ...] = ()) -> TorchrunResult:
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node nproc script *args``
    with ``OMP_NUM_THREADS=1`` and unbuffered output, and return each rank's output.

    Raises :class:`RanksFailed` when torchrun fails, naming every rank that exited non-zero
    with the end of its stderr; at ``timeout`` seconds torchrun and every process it started
    are killed, and the error carries what each rank had written by then.
    """
    __tracebackhide__ = True
    logs = tempfile.mkdtemp(prefix="distshard-torchrun-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--log-dir={logs}", "--redirects=3", *torchrun_args,
           str(script), *map(str, args)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1") | (env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment, cwd=cwd, start_new_session=True)
    try:
        try:
            launcher, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            launcher, _ = proc.communicate()
            timed_out = True
        result = TorchrunResult(stdout=[_rank_log(logs, r, "stdout") for r in range(nproc)],
                                stderr=[_rank_log(logs, r, "stderr") for r in range(nproc)],
                                launcher=launcher)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    if timed_out or proc.returncode != 0:
        raise _torchrun_failure(result, cmd, proc.returncode, timeout if timed_out else None)
    return result


def end_job(exit_code: int = 0) -> NoReturn:
    """End this rank of a torchrun job: wait for every rank, destroy the process group, flush
    output and logs, and exit with ``exit_code`` without the interpreter's own teardown.

    Why not simply return: torch keeps a gloo process group alive after
    ``destroy_process_group`` while anything still refers to it, and then its worker threads
    outlive it. Things that do: ``torch.distributed.nn``'s default arguments when it is first
    imported after ``init_process_group`` (FSDP and transformers models import it), a device
    mesh that DTensor still caches, a live DDP or FSDP wrapper. A worker that drops a finished
    collective (a barrier keeps the collectives before it alive until it is dropped) frees that
    collective's tensors, which takes the GIL; if the interpreter is shutting down by then, the
    thread is stopped inside a destructor and the process aborts after all its work is done
    ("terminate called without an active exception", exit code -6). With four gloo ranks on two
    cores that happened in about one run in 15 to 50 of ``launch_examples/demo.py``. Leaving
    with ``os._exit`` after the barrier gives the worker threads nothing to race. ``atexit``
    handlers do not run; stdout, stderr and :mod:`logging` are flushed first.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank done with its last collective
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):  # closed or replaced by a non-file
            pass
    os._exit(exit_code)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the workers (each in its own session, so out of reach of the launcher's process
    group) and their children, then torchrun's group."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rank_log(logs: str, rank: int, stream: str) -> str:
    found = sorted(Path(logs).glob(f"*/attempt_*/{rank}/{stream}.log"))
    return found[-1].read_text(errors="replace") if found else ""


_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


_TEARDOWN_ABORT = "terminate called without an active exception"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _torchrun_failure(result: TorchrunResult, cmd: list[str], returncode: int,
                      timeout: float | None) -> RanksFailed:
    nproc = len(result.stdout)
    if timeout is not None:
        codes = {r: None for r in range(nproc)}
        head = f"torchrun did not finish within {timeout:.0f} s; it and every rank were killed"
    else:
        codes = {int(r): int(c) for r, c in _FAILURE.findall(result.launcher)}
        codes = codes or {r: None for r in range(nproc) if result.stderr[r].strip()}
        head = f"torchrun exited with code {returncode}"
    errors = {}
    for rank in sorted(codes):
        code = codes[rank]
        why = ("killed at the deadline" if timeout is not None else
               "exit code unknown" if code is None else
               f"exit code {code}" if code >= 0 else
               f"stopped by torchrun ({_signal_name(-code)}) after another rank failed"
               if -code in (signal.SIGTERM, signal.SIGKILL) else
               f"killed by {_signal_name(-code)}")
        if _TEARDOWN_ABORT in result.stderr[rank]:
            why += (" in the interpreter's teardown, after its work: a gloo worker thread of a "
                    "process group that outlived destroy_process_group; end the script with "
                    "distshard.testing.end_job()")
        errors[rank] = (f"rank {rank}: {why}\n[stderr]\n{result.stderr[rank][-4000:]}"
                        f"[stdout]\n{result.stdout[rank][-2000:]}")
    text = "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors.items())
    if not errors:
        text = f"--- torchrun ---\n{result.launcher[-4000:]}"
    ok = {r: result.stdout[r] for r in range(nproc) if r not in errors}
    return RanksFailed(f"{head}: {' '.join(cmd)}\n{text}", errors, ok)
