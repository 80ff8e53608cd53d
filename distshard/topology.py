"""Which ranks share a node. Pure, apart from reading this process's environment.

A rank's node is named by ``DISTSHARD_NODE`` when set (an override for unusual launchers), else by
torchrun's ``GROUP_RANK`` (the agent's node rank, the same on every rank it started), else by the
host name. Ranks with the same name are taken to share a machine: its page cache, its
``/dev/shm`` and its memory bandwidth. That is checked before it is relied on (see
:mod:`distshard.shm`).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Topology", "node_key", "node_name"]


def node_name() -> str:
    """This process's node, as described in the module docstring."""
    if os.environ.get("DISTSHARD_NODE"):
        return "node:" + os.environ["DISTSHARD_NODE"]
    if os.environ.get("GROUP_RANK"):
        return "group-rank:" + os.environ["GROUP_RANK"]
    return "host:" + socket.gethostname()


def node_key(name: str) -> int:
    """A 63-bit digest of a node name, to travel with the other integers ranks agree on."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True, slots=True)
class Topology:
    """``node_of[r]`` is the node index of group rank ``r``; nodes are numbered in order of
    their lowest rank.

    >>> t = Topology.from_keys([7, 7, 9, 9, 7])
    >>> t.node_of, t.ranks_on(0), t.local_index(4), t.num_nodes
    ((0, 0, 1, 1, 0), (0, 1, 4), 2, 2)
    """

    node_of: tuple[int, ...]

    @classmethod
    def from_keys(cls, keys: Sequence[int]) -> Topology:
        index: dict[int, int] = {}
        return cls(tuple(index.setdefault(k, len(index)) for k in keys))

    @classmethod
    def single(cls, world_size: int) -> Topology:
        return cls((0,) * world_size)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of, default=-1) + 1

    def ranks_on(self, node: int) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.node_of) if n == node)

    def local_index(self, rank: int) -> int:
        return self.ranks_on(self.node_of[rank]).index(rank)
