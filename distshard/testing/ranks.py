"""N gloo ranks in fresh processes, each with a deadline (see :mod:`distshard.testing`).

A gloo job's ranks start from a fork server by default: a fresh interpreter, started on the
first call, that imports torch, torch.distributed, distshard (and transformers, where the caller
has imported it) once; each rank is then a fork of it, in a fraction of a second, where a
spawned rank imports torch again (seconds per rank, on every call). A forked rank gets the
caller's environment, working directory, ``sys.path``, standard output and error as they are at
the call, as a spawned rank does. What differs from spawned ranks:

- what the preloaded modules read from the environment when they were imported (in the
  server, at the first call: transformers' and torch's logging settings, say) stays as it was
  then;
- every rank of every call has the server's seed of ``str`` hashes (``PYTHONHASHSEED``), so
  code whose result depends on a set's order across ranks is not exercised by different
  orders, as it is on spawned ranks;
- the server is the process's own (:func:`multiprocessing.set_forkserver_preload` names the
  modules above for it); one that other code started first is used as it is.

``start_method="spawn"`` starts each rank as a new interpreter (the default for other backends,
and where the platform has no fork server).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import reduction
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DEFAULT_TIMEOUT", "RanksFailed", "run_ranks"]

DEFAULT_TIMEOUT = 120.0
_HERE = os.path.dirname(os.path.abspath(__file__))


class RanksFailed(AssertionError):
    """One or more ranks raised, exited, or missed the deadline. ``errors`` maps rank -> text;
    ``results`` maps the other ranks to what they returned."""

    def __init__(self, message: str, errors: dict[int, str], results: dict[int, Any]) -> None:
        super().__init__(message)
        self.errors = errors
        self.results = results


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
              backend: str = "gloo", env: dict[str, str] | None = None,
              start_method: str | None = None) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return their results in
    rank order. ``fn`` and ``args`` must be picklable; the process group is initialised before
    ``fn`` runs and destroyed after. ``env`` is set in each rank, over the caller's
    environment. ``start_method``: ``"forkserver"`` or ``"spawn"`` (default: the fork server
    for gloo where the platform has one, see the module's docstring)."""
    __tracebackhide__ = True  # pytest shows the ranks' tracebacks, not this function's source
    if start_method is None:
        start_method = ("forkserver" if backend == "gloo"
                        and "forkserver" in mp.get_all_start_methods() else "spawn")
    if start_method == "forkserver":
        # (read when the server starts: the first call; later calls reuse it)
        mp.set_forkserver_preload(["torch", "torch.distributed", "distshard", *(
            ["transformers"] if "transformers" in sys.modules else [])])
    tmp = tempfile.mkdtemp(prefix="distshard-ranks-")
    results = mp.get_context(start_method).SimpleQueue()
    environment = {**os.environ, **(env or {})}
    ctx = mp.start_processes(
        _rank_main, args=(fn, world_size, args, os.path.join(tmp, "rdzv"), results, backend,
                          timeout, environment, _stdio()),
        nprocs=world_size, join=False, start_method=start_method)
    try:
        return _collect(ctx, results, world_size, timeout)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
        shutil.rmtree(tmp, ignore_errors=True)


def _stdio() -> list:
    """The caller's standard output and error, where it has them open."""
    out = []
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.append(_Descriptor(fd))
    return out


class _Descriptor:
    """One of the caller's file descriptors, duplicated into the rank as the process starts
    (what a spawned rank inherits; a forked one would have the fork server's)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _received, (self.fd, reduction.DupFd(self.fd))


def _received(fd: int, duplicate) -> tuple[int, int]:
    return fd, duplicate.detach()


def _collect(ctx, results, world_size: int, timeout: float) -> list[Any]:
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    done: dict[int, tuple[bool, Any]] = {}
    while len(done) < world_size:
        while not results.empty():
            rank, ok, value = results.get()
            done[rank] = (ok, value)
        if len(done) == world_size:
            break
        for rank, p in enumerate(ctx.processes):
            if rank not in done and p.exitcode is not None and results.empty():
                done[rank] = (False, f"rank {rank} exited with code {p.exitcode} without a result")
        if time.monotonic() > deadline:
            for rank in range(world_size):
                done.setdefault(rank, (False, f"rank {rank} did not finish within {timeout:.0f} s "
                                              "(hung?); all ranks were killed"))
            break
        time.sleep(0.05)
    errors = {rank: value for rank, (ok, value) in sorted(done.items()) if not ok}
    if errors:
        text = "\n".join(f"--- rank {rank} ---\n{msg}" for rank, msg in errors.items())
        results = {rank: value for rank, (ok, value) in sorted(done.items()) if ok}
        raise RanksFailed(f"{len(errors)} of {world_size} rank(s) failed:\n{text}", errors, results)
    return [done[rank][1] for rank in range(world_size)]


def _rank_main(rank, fn, world_size, args, rdzv_file, results, backend, timeout, env,
               stdio) -> None:
    # the caller's environment and output (a forked rank has the fork server's, from its start)
    for fd, duplicate in stdio:
        if duplicate != fd:  # (a spawned rank has the caller's under its own number)
            (sys.stdout if fd == 1 else sys.stderr).flush()
            os.dup2(duplicate, fd)
            os.close(duplicate)
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tempfile.tempdir = None  # (TMPDIR may differ from the server's)
    time.tzset()
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"file://{rdzv_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        # Every rank connected before any runs: a rank that fails at once and exits while a
        # peer is still inside gloo's init_process_group would fail that peer there, and the
        # peer's own error would be lost.
        dist.barrier()
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException as e:
        results.put((rank, False, _format_failure(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _format_failure(e: BaseException) -> str:
    """The traceback from the first frame outside this package: the rank's own code."""
    tb = e.__traceback__
    while tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == _HERE:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb or e.__traceback__))
