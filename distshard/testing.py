"""Test distributed code on a CPU-only machine: N gloo ranks in spawned processes, small sharded
checkpoints written the way users' tools write them, and a user's own torchrun script run with a
deadline.

Ranks in spawned processes
--------------------------
::

    from distshard.testing import run_ranks

    def body(rank, world_size, ckpt):          # module level, so spawn can import it
        ...
        return something_picklable

    results = run_ranks(body, 4, ckpt, timeout=120)   # [rank 0's result, rank 1's, ...]

Rendezvous is a file in a fresh temporary folder (no ports), every rank gets
``OMP_NUM_THREADS=1``, and a deadline kills every rank: a hang fails the test instead of
stalling it. When ranks fail, :class:`RanksFailed` carries every failing rank's own traceback,
not only a peer's "connection closed".

In pytest: a decorator, and a fixture
-------------------------------------
Enable the plugin in your ``conftest.py`` (it is not registered globally)::

    pytest_plugins = ["distshard.testing"]

A module-level test function decorated with ``@distributed`` runs on every rank; its first two
parameters are the rank and the world size, the others are pytest fixtures, whose values are
pickled to every rank. ``dist_ranks`` runs any module-level function on N ranks and returns
what each returned (deadline: the ini option ``distshard_timeout``, default 120 s). A user's
``test_model.py`` next to their ``train.py``::

    import pytest
    import torch
    import torch.distributed as dist

    import distshard
    from distshard.testing import distributed, run_torchrun, write_checkpoint
    from train import build

    @pytest.fixture
    def checkpoint(tmp_path):
        torch.manual_seed(0)
        model = build()
        torch.save(model.state_dict(), tmp_path / "expected.pt")
        return write_checkpoint(model, tmp_path / "ckpt", max_shard_size="1KB"), tmp_path / "expected.pt"

    @distributed(world_size=2, timeout=60)
    def test_every_rank_gets_the_same_weights(rank, world_size, checkpoint):
        path, expected = checkpoint
        with torch.device("meta"):
            model = build()
        distshard.load(model, path)
        want = torch.load(expected)
        for name, value in model.state_dict().items():
            assert torch.equal(value, want[name]), name

    def world_sum(rank, world_size):
        total = torch.tensor([rank + 1])
        dist.all_reduce(total)
        return total.item()

    def test_ranks_agree(dist_ranks):
        assert dist_ranks(world_sum, 3) == [6, 6, 6]

    def test_train_script_under_torchrun(checkpoint):
        result = run_torchrun("train.py", 2, "--checkpoint", checkpoint[0], timeout=120)
        assert result.stdout == ["rank 0: loaded 4 tensors\\n", "rank 1: loaded 4 tensors\\n"]

Spawned ranks find a decorated test, or a function given to ``dist_ranks``, by its module name,
or from its file where pytest imported it by path (``--import-mode=importlib``). A failing rank
fails the test with its own traceback::

    E   distshard.testing.RanksFailed: 1 of 2 rank(s) failed:
        --- rank 1 ---
        Traceback (most recent call last):
          File "/tmp/demo_user/test_fails.py", line 11, in test_all_reduce_sums
            assert total.item() == 3 + rank  # wrong on rank 1
        AssertionError

Your own torchrun script
------------------------
:func:`run_torchrun` runs ``python -m torch.distributed.run --standalone --nproc-per-node N``
on a script (workers with ``OMP_NUM_THREADS=1``, unbuffered), returns each rank's stdout and
stderr, kills torchrun and every worker at the deadline, and raises :class:`RanksFailed` with
the output of each failing rank. :func:`write_checkpoint` writes the small sharded checkpoint
such a test loads. End such a script with :func:`end_job` (see there why, on gloo).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

__all__ = ["RanksFailed", "TorchrunResult", "distributed", "end_job", "run_ranks", "run_torchrun",
           "write_checkpoint"]

DEFAULT_TIMEOUT = 120.0


class RanksFailed(AssertionError):
    """One or more ranks raised, exited, or missed the deadline. ``errors`` maps rank -> text;
    ``results`` maps the other ranks to what they returned."""

    def __init__(self, message: str, errors: dict[int, str], results: dict[int, Any]) -> None:
        super().__init__(message)
        self.errors = errors
        self.results = results


# --- ranks in spawned processes -----------------------------------------------------------

def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
              backend: str = "gloo", env: dict[str, str] | None = None) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return their results in
    rank order. ``fn`` and ``args`` must be picklable; the process group is initialised before
    ``fn`` runs and destroyed after."""
    __tracebackhide__ = True  # pytest shows the ranks' tracebacks, not this function's source
    tmp = tempfile.mkdtemp(prefix="distshard-ranks-")
    results = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(
        _rank_main, args=(fn, world_size, args, os.path.join(tmp, "rdzv"), results, backend,
                          timeout, env or {}),
        nprocs=world_size, join=False, start_method="spawn")
    try:
        return _collect(ctx, results, world_size, timeout)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
        shutil.rmtree(tmp, ignore_errors=True)


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


def _rank_main(rank, fn, world_size, args, rdzv_file, results, backend, timeout, env) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(env)
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
    """The traceback from the first frame outside this module: the rank's own code."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb or e.__traceback__))


# --- @distributed ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _FunctionRef:
    """How a spawned rank finds a module-level function: by module, name and file, rather than
    by pickling it. A decorated test's name is bound to its runner, so pickle would hand the
    rank the runner (which would spawn again); and a module that pytest imported from its path
    (``--import-mode=importlib``) is not importable by name in a fresh process."""

    module: str
    qualname: str
    file: str | None

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A reference to ``fn`` when it is a module-level function; else ``fn`` itself."""
        if not inspect.isfunction(fn) or "." in fn.__qualname__:
            return fn
        return cls(fn.__module__, fn.__qualname__, inspect.getsourcefile(fn))

    def __call__(self, rank: int, world_size: int, *args: Any) -> Any:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            if self.file is None:
                raise
            spec = importlib.util.spec_from_file_location(self.module, self.file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.module] = module
            spec.loader.exec_module(module)
        fn = getattr(module, self.qualname)
        return getattr(fn, "__distshard_body__", fn)(rank, world_size, *args)


def distributed(world_size: int = 2, *, timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo",
                env: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., None]]:
    """Run the decorated module-level test function on ``world_size`` spawned ranks.

    The function takes ``(rank, world_size, *fixtures)``; pytest sees only the fixtures, and
    their values are sent to every rank. The test fails with :class:`RanksFailed` (every
    failing rank's traceback) when a rank raises or the ranks miss ``timeout`` seconds.
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., None]:
        if not inspect.isfunction(fn) or "." in fn.__qualname__:
            raise TypeError(f"@distributed needs a module-level function, which spawned ranks can "
                            f"import by name; {getattr(fn, '__qualname__', fn)!r} is not one")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                  for p in params):
            raise TypeError(f"@distributed: {fn.__qualname__} must take (rank, world_size, "
                            "*fixtures) as plain positional parameters")
        visible = inspect.Signature(params[2:])
        ref = _FunctionRef.of(fn)

        @functools.wraps(fn)
        def runner(*args: Any, **kwargs: Any) -> None:
            __tracebackhide__ = True
            bound = visible.bind(*args, **kwargs)
            run_ranks(ref, world_size, *bound.args, timeout=timeout, backend=backend, env=env)

        runner.__signature__ = visible  # what pytest reads for fixtures
        runner.__distshard_body__ = fn
        return runner
    return decorate


# --- write_checkpoint -----------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``, a count or a string with Hugging Face's units (KB = 1000 bytes).

    >>> parse_size("40KB"), parse_size("1MiB"), parse_size(512)
    (40000, 1048576, 512)
    """
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"max_shard_size must be a positive byte count like 40KB, got {size!r}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]


def write_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, *,
                     max_shard_size: int | str = "40KB", format: str = "safetensors") -> str:
    """Write ``model``'s state dict as a (sharded) Hugging Face checkpoint; return the folder.

    A transformers model in safetensors is written by its own ``save_pretrained``. Anything
    else, and every ``.bin`` checkpoint (transformers 5 no longer writes them), is written here
    the way those tools did: shards of at most ``max_shard_size`` in state-dict order, named
    ``model-00001-of-0000n.safetensors`` / ``pytorch_model-00001-of-0000n.bin`` with their
    index json, or one ``model.safetensors`` / ``pytorch_model.bin`` when everything fits.
    Tied weights: safetensors keeps the first name (the loader re-ties); a ``.bin`` keeps every
    name, with tensors that share storage in one file, as ``torch.save`` of a state dict does.
    The model must be unsharded and off the meta device.
    """
    if format not in ("safetensors", "bin"):
        raise ValueError(f"format must be 'safetensors' or 'bin', got {format!r}")
    limit = parse_size(max_shard_size)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if format == "safetensors" and callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(path, max_shard_size=limit)
        return str(path)
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(path)
    state = model.state_dict()
    groups = _storage_groups(state, dedupe=format == "safetensors")
    order = {name: i for i, name in enumerate(state)}  # each file keeps the state-dict order
    shards = [dict(sorted(s.items(), key=lambda kv: order[kv[0]])) for s in _split(groups, limit)]
    prefix, ext = ("model", "safetensors") if format == "safetensors" else ("pytorch_model", "bin")
    names = ([f"{prefix}.{ext}"] if len(shards) == 1 else
             [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        if format == "safetensors":
            from safetensors.torch import save_file
            save_file(shard, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(shard, path / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(g) for g in groups)},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (path / f"{prefix}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return str(path)


def _storage_groups(state: dict[str, torch.Tensor], *, dedupe: bool) -> list[dict[str, torch.Tensor]]:
    """State-dict entries grouped by the storage they share, in state-dict order. With
    ``dedupe``, names of the very same tensor collapse to the first, and every tensor gets its
    own contiguous copy (safetensors refuses shared or strided storage)."""
    groups: dict[object, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or isinstance(t, DTensor):
            raise ValueError(f"write_checkpoint: {name!r} is a {type(t).__name__}; gather a "
                             "sharded model (DTensor) into plain tensors first")
        if t.device.type == "meta":
            raise ValueError(f"write_checkpoint: {name!r} is on the meta device: no values to write")
        t = t.detach().cpu()
        storage = (t.untyped_storage().data_ptr() if t.numel() else ("empty", name))
        if dedupe:
            ident = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in groups:
                continue
            groups[ident] = {name: t.clone(memory_format=torch.contiguous_format)}
        else:
            groups.setdefault(storage, {})[name] = t.contiguous()
    return list(groups.values())


def _nbytes(group: dict[str, torch.Tensor]) -> int:
    seen = {}
    for t in group.values():
        seen[t.untyped_storage().data_ptr() or id(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _split(groups: list[dict[str, torch.Tensor]], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for group in groups:
        n = _nbytes(group)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += n
    return shards


# --- run_torchrun ---------------------------------------------------------------------------

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


# --- pytest plugin: enabled by `pytest_plugins = ["distshard.testing"]` ---------------------

try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None

if pytest is not None:
    def pytest_addoption(parser) -> None:
        parser.addini("distshard_timeout", "deadline in seconds of the dist_ranks fixture",
                      default=str(DEFAULT_TIMEOUT))

    @pytest.fixture
    def dist_ranks(request) -> Callable[..., list[Any]]:
        """``dist_ranks(fn, world_size, *args, timeout=None, env=None)``: :func:`run_ranks` with
        the deadline from the ini option ``distshard_timeout`` unless given."""
        try:
            default = float(request.config.getini("distshard_timeout"))
        except ValueError:  # the fixture was imported without the plugin's ini option
            default = DEFAULT_TIMEOUT

        def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float | None = None,
                **kwargs: Any) -> list[Any]:
            __tracebackhide__ = True
            return run_ranks(_FunctionRef.of(fn), world_size, *args, timeout=timeout or default,
                             **kwargs)
        return run
