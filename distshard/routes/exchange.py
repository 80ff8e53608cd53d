"""Run the chosen routes: every rank of the group runs :meth:`Exchange.run` over the same plan.

Collective steps run in plan order, consecutive steps of one route together (the node's shared
copy takes every bucket of the load at once); steps that are not collective (a rank reading its
own rows) run after them, on reader threads. A rank that fails keeps joining every collective
and returns its failure, to be raised by everyone at the next agreement.
"""

from __future__ import annotations

import torch

from ..comm import Comm
from ..errors import RankFailure
from ..plan import Box, LoadPlan
from ..reader import ShardReader
from ..shm import NodeImage
from ..topology import Topology
from .broadcast import Broadcast
from .choose import choose
from .image_layout import ImageLayout
from .node_image import NodeImageRoute
from .own_rows import OwnRows
from .page_cache import PageCache
from .readahead import ReadAhead
from .shared import Context, Route, Step
from .slices import Slices

__all__ = ["Exchange"]


class Exchange:
    """One rank's part in moving every bucket of ``plan`` into ``dests`` (or, for a shared
    copy, into the views the route makes: :attr:`dests` afterwards)."""

    def __init__(self, comm: Comm, plan: LoadPlan, reader: ShardReader,
                 dests: dict[str, torch.Tensor] | None, boxes: list[dict[str, Box]] | None,
                 *, read_own_slices: bool = True, image: NodeImage | None = None,
                 layout: ImageLayout | None = None, topology: Topology | None = None,
                 node_local: bool = False, mapped: bool = False) -> None:
        topology = topology or Topology.single(comm.world_size)
        self.ctx = Context(comm, plan, reader, dests, boxes, topology, node_local)
        self.read_own_slices = read_own_slices
        self.routes: dict[str, Route] = {"broadcast": Broadcast(), "own_rows": OwnRows(),
                                         "slices": Slices()}
        self.replication = "broadcast"
        if mapped:
            self.replication, self.routes["page_cache"] = "page_cache", PageCache()
        elif image is not None:
            self.replication = "node_image"
            self.routes["node_image"] = NodeImageRoute(image, layout)

    @property
    def dests(self) -> dict[str, torch.Tensor] | None:
        return self.ctx.dests

    @dests.setter
    def dests(self, value: dict[str, torch.Tensor] | None) -> None:
        self.ctx.dests = value

    @property
    def reader(self) -> ShardReader:
        return self.ctx.reader

    @property
    def bytes_received(self) -> int:
        return self.ctx.bytes_received

    def run(self) -> RankFailure | None:
        ctx = self.ctx
        steps = choose(ctx.plan, ctx.boxes, ctx.rank, replication=self.replication,
                       topology=ctx.topology, node_local=ctx.node_local,
                       read_own_slices=self.read_own_slices, dests=ctx.dests)
        ahead = [s.bucket for s in steps if s.bucket.owner == ctx.rank
                 and s.route in ("broadcast", "slices")]
        ctx.ahead = ReadAhead(ctx, ahead) if ahead else None
        try:
            local: dict[str, list[Step]] = {}
            for route, run in _runs(steps):
                if self.routes[route].collective:
                    self.routes[route].move(ctx, run)
                else:
                    local.setdefault(route, []).extend(run)
            for route, run in local.items():
                self.routes[route].move(ctx, run)
        finally:
            if ctx.ahead is not None:
                ctx.ahead.close()
                ctx.ahead = None
        ctx.guard("distribute", ctx.check_filled)
        return ctx.failure


def _runs(steps: list[Step]) -> list[tuple[str, list[Step]]]:
    """The steps cut into runs of consecutive steps of one route."""
    runs: list[tuple[str, list[Step]]] = []
    for step in steps:
        if runs and runs[-1][0] == step.route:
            runs[-1][1].append(step)
        else:
            runs.append((step.route, [step]))
    return runs
