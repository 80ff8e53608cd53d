"""One file on every node: each node's copy of the checkpoint against the one rank 0 planned.

Nodes often hold their own copies of a checkpoint (staged onto local disks by ``cp`` or
``rsync``), made at other times than rank 0's: their modification times differ, their bytes do
not. Across nodes a file is therefore identified by its size and a digest of its metadata: the
safetensors header (names, dtypes, shapes, offsets), or for a ``.bin`` file its first
:data:`BIN_DIGEST_BYTES` (the zip's pickled index comes first). A change *during* the load is
still caught, per node, by that node's own ``(size, mtime)``: taken here, compared again when a
reader opens the file. What no cheap check sees: two copies with the same header but other
tensor data (``distshard verify --hash`` on each node compares every byte).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct

from .errors import DistShardError
from .index import MAX_HEADER_BYTES, safe_path
from .plan import LoadPlan
from .topology import Topology, node_name

__all__ = ["BIN_DIGEST_BYTES", "digests", "local_plan", "metadata_digest"]

BIN_DIGEST_BYTES = 1 << 20

_STAGING = ("stage identical copies on every node (cp -r or rsync of one checkpoint folder; "
            "times need not be kept) and compare them with `distshard verify --hash` on each "
            "node, or load from one shared path")


def metadata_digest(path: str, kind: str) -> str:
    """A digest of the file's metadata: the safetensors header with its length, or the first
    :data:`BIN_DIGEST_BYTES` of a ``.bin`` file."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead of tensor data
        if kind == "safetensors":
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            data = head + f.read(min(length, MAX_HEADER_BYTES))
        else:
            data = f.read(BIN_DIGEST_BYTES)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digests(root: str, plan: LoadPlan, topology: Topology) -> tuple[str, dict[str, str]] | None:
    """Rank 0: its node's name and each planned file's metadata digest, when other nodes will
    compare theirs (more than one node); None otherwise."""
    if topology.num_nodes == 1:
        return None
    return node_name(), {f.name: metadata_digest(safe_path(root, f.name), f.kind)
                         for f in plan.files}


def local_plan(root: str, plan: LoadPlan, planned: tuple[str, dict[str, str]] | None,
               topology: Topology, rank: int) -> LoadPlan:
    """The plan as this rank checks its files when reading: on rank 0's node, as planned; on
    another node, with its own copy's ``(size, mtime)``, once the copy is found to be the same
    file (the node's first rank compares metadata digests; every rank compares sizes). Raises
    a :class:`DistShardError` naming the file, the nodes and what differs."""
    if planned is None or topology.node_of[rank] == topology.node_of[0]:
        return plan
    check_digest = topology.local_index(rank) == 0
    first, planned = planned
    files = []
    for f in plan.files:
        path = safe_path(root, f.name)
        where = (f"file {f.name!r} differs between node {node_name()!r} (rank {rank}) and "
                 f"node {first!r} (rank 0): ")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DistShardError(f"file {f.name!r} is missing on node {node_name()!r} (rank "
                                 f"{rank}); node {first!r} (rank 0) has it; {_STAGING}",
                                 file=f.name) from None
        if st.st_size != f.size:
            raise DistShardError(where + f"{st.st_size} bytes on the first, {f.size} on the "
                                 "second; " + _STAGING, file=f.name)
        if check_digest and metadata_digest(path, f.kind) != planned[f.name]:
            what = "safetensors header" if f.kind == "safetensors" else (
                f"first {BIN_DIGEST_BYTES >> 20} MiB")
            raise DistShardError(where + f"same size, other {what} (tensor names, dtypes, "
                                 f"shapes or offsets); {_STAGING}", file=f.name)
        files.append(dataclasses.replace(f, size=st.st_size, mtime_ns=st.st_mtime_ns))
    return dataclasses.replace(plan, files=tuple(files))
