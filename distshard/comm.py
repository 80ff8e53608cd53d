"""The collectives of a load. No files here.

Every function of :class:`Comm` is a collective: every rank of the group calls it, in the same
order. Errors never skip a collective: a rank that failed keeps taking part (with whatever bytes
it has) and reports its failure at the next :meth:`Comm.agree`, where every rank learns of it.
That is what keeps one rank's error from leaving the others waiting forever.
"""

from __future__ import annotations

import pickle
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DistShardError, RankFailure
from .record import paused_gc

__all__ = ["Comm", "failure_of"]


class Comm:
    """A process group (or a single process when torch.distributed is not initialised).

    Every operation waits at most ``timeout`` for the other ranks (gloo; on nccl the group's own
    watchdog applies): a rank that died or stalls becomes an error on the others rather than a
    wait of the job's own timeout (30 minutes by default). Objects travel as pickled bytes over
    the same bounded operations.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: timedelta | None = None,
                 action: str = "load") -> None:
        self.action = action  # what failed, in the errors agree raises
        self.distributed = dist.is_available() and dist.is_initialized()
        if group is not None and not self.distributed:
            raise ValueError("group= was given but torch.distributed is not initialised")
        self.group, self.timeout = group, timeout
        if not self.distributed:
            self.rank, self.world_size, self.backend = 0, 1, None
            self.device = torch.device("cpu")
            return
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(
                "this process is not a member of group=; only the group's ranks call distshard.load")
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.device = _backend_device(self.backend)

    def _wait(self, *works) -> None:
        for work in works:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Broadcast ``tensor`` in place from group rank ``src``."""
        if self.world_size > 1:
            self._wait(dist.broadcast(tensor, group=self.group, group_src=src, async_op=True))

    def barrier(self) -> None:
        if self.world_size > 1:
            self._wait(dist.barrier(group=self.group, async_op=True))

    def exchange(self, sends: list[tuple[torch.Tensor, int]],
                 recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Point-to-point: send each ``(tensor, group rank)`` of ``sends``, receive each of
        ``recvs``, and wait for all. Only the ranks named take part."""
        ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=r) for t, r in sends]
        ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=r) for t, r in recvs]
        if ops:
            self._wait(*dist.batch_isend_irecv(ops))

    def all_gather(self, row: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [row]
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        self._wait(dist.all_gather(rows, row, group=self.group, async_op=True))
        return rows

    def all_gather_object(self, obj: object) -> list:
        if self.world_size == 1:
            return [obj]
        data = self._to_bytes(obj)
        sizes = [int(n) for n in self.all_gather(torch.tensor([data.numel()], device=self.device))]
        padded = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
        padded[:data.numel()] = data
        rows = self.all_gather(padded)
        return [_loads(r[:n]) for r, n in zip(rows, sizes)]

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        if self.world_size == 1:
            return obj
        data = self._to_bytes(obj) if self.rank == src else None
        size = torch.tensor([0 if data is None else data.numel()], device=self.device)
        self.broadcast(size, src)
        if data is None:
            data = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        self.broadcast(data, src)
        return obj if self.rank == src else _loads(data)

    def _to_bytes(self, obj: object) -> torch.Tensor:
        with paused_gc():  # a plan is an object or more per tensor (see paused_gc)
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)

    def agree(self, failure: RankFailure | None, stats: list[int]) -> list[list[int]]:
        """Exchange each rank's failure flag and integer ``stats``; return every rank's stats.

        If any rank failed, every rank raises the same :class:`DistShardError` listing all
        failures. One small all-gather when all is well; failure messages travel only when a
        rank failed.
        """
        row = torch.tensor([int(failure is not None), *stats], dtype=torch.int64, device=self.device)
        rows = self.all_gather(row)
        if any(int(r[0]) for r in rows):
            failures = self.all_gather_object(failure)
            raise DistShardError.from_failures([f for f in failures if f is not None],
                                               self.action)
        return [r[1:].tolist() for r in rows]


def _loads(data: torch.Tensor) -> object:
    with paused_gc():
        return pickle.loads(data.cpu().numpy().tobytes())


def _backend_device(backend: str) -> torch.device:
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failure_of(exc: BaseException, rank: int, phase: str) -> RankFailure:
    """Record a local exception; a DistShardError keeps its file and key."""
    message = str(exc) if isinstance(exc, DistShardError) else f"{type(exc).__name__}: {exc}"
    return RankFailure(rank=rank, phase=phase, message=message,
                       file=getattr(exc, "file", None), key=getattr(exc, "key", None),
                       traceback="".join(traceback.format_exception(exc)))
