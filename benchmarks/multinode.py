"""Several nodes on shared, slow storage (scenario S2), simulated on one machine, in one run, cold.

    sudo python benchmarks/multinode.py [--size large] [--nodes 2] [--ranks-per-node 2]
                                        [--cap-mbps 200] [--modes replicated sharded]
                                        [--json out.json] [--chart out.png] [--profile]

Each simulated node is one ``torchrun`` agent (``--nnodes``, ``--node-rank``, a rendezvous on
127.0.0.1) started inside its own mount namespace (``unshare -m``) where its own copy of the
checkpoint is bound at one common path: every node sees "the" checkpoint at the same place, but
no page cache is shared between nodes, as on real machines. The copies are made as ``cp`` makes
them, at other times than the original (distshard identifies them by size and header).
``--profile``: every rank runs under cProfile, and the run ends with where each rank's time
went (planning, reading, sending between nodes, waiting, materialising).

Every agent runs in one blkio cgroup whose read bandwidth on the checkpoint's disk is capped
(``--cap-mbps``): the storage server that all nodes share. Every loader runs in this same
harness (see compare.py for the loaders, the touch pass, memory and checksum); copies are
evicted from the page cache before every run.

Bound: checkpoint bytes / cap (reading each byte once per job at the cap). Disk: bytes the block
device read during the run (every node); max rank: the most one rank caused to be read.

Needs root (mount namespaces, cgroups). Without it, or without a cgroup v1 blkio or v2 io
controller, it says so and exits 0 having measured nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import NoReturn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import (  # noqa: E402
    HEADER,
    SIZES,
    chart,
    evict,
    finish_block,
    measure,
    sample_checkpoint,
)

# distshard-node: locality="node" (each node reads the whole checkpoint; nothing crosses nodes)
LOADERS = ["distshard", "distshard-node", "transformers", "accelerate", "rank0-bcast", "dcp"]


def worker(loader: str, mode: str, ckpt: str, out: str) -> NoReturn:
    """One rank, under torchrun: load, touch, report to ``out/rank<R>.json``."""
    import torch.distributed as dist
    from compare import _rank

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    profile_dir = os.environ.get("DISTSHARD_S2_PROFILE")
    profile = cProfile.Profile() if profile_dir else None
    try:
        if profile is not None:
            profile.enable()
        result = _rank(rank, world, loader, ckpt, mode == "sharded")
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.path.join(profile_dir, f"{loader}-{mode}-rank{rank}.prof"))
        result["node"] = int(os.environ.get("GROUP_RANK", "0"))
    except Exception as e:
        result = dict(error=f"{type(e).__name__}: {e}")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    from distshard.testing import end_job

    end_job()  # barrier, destroy the process group, exit (after the clock: imports here are free)


class Cap:
    """A cgroup whose reads from one disk are capped at ``bps`` bytes/second (v1 blkio or v2 io)."""

    def __init__(self, path: str, bps: int) -> None:
        st = os.stat(path)
        dev = _whole_disk(os.major(st.st_dev), os.minor(st.st_dev))
        v1 = "/sys/fs/cgroup/blkio"
        if os.path.exists(os.path.join(v1, "blkio.throttle.read_bps_device")):
            self.dir = os.path.join(v1, f"distshard-s2-{os.getpid()}")
            os.makedirs(self.dir, exist_ok=True)
            _write(os.path.join(self.dir, "blkio.throttle.read_bps_device"), f"{dev} {bps}")
        elif "io" in _read("/sys/fs/cgroup/cgroup.controllers").split():
            _write("/sys/fs/cgroup/cgroup.subtree_control", "+io")
            self.dir = f"/sys/fs/cgroup/distshard-s2-{os.getpid()}"
            os.makedirs(self.dir, exist_ok=True)
            _write(os.path.join(self.dir, "io.max"), f"{dev} rbps={bps}")
        else:
            raise OSError("no cgroup v1 blkio or v2 io controller to cap reads with")

    def enter_command(self) -> str:
        return f"echo $$ > {self.dir}/cgroup.procs"

    def close(self) -> None:
        for _ in range(50):  # the agents' processes may take a moment to leave
            try:
                os.rmdir(self.dir)
                return
            except OSError:
                time.sleep(0.1)


def _whole_disk(major: int, minor: int) -> str:
    """Throttling applies to whole disks: a partition is mapped to its disk."""
    sys_dev = os.path.realpath(f"/sys/dev/block/{major}:{minor}")
    if os.path.exists(os.path.join(sys_dev, "partition")):
        return _read(os.path.join(os.path.dirname(sys_dev), "dev")).strip()
    return f"{major}:{minor}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(loader: str, mode: str, copies: list[str], mount: str, ranks_per_node: int,
            cap: Cap, timeout: float) -> list[dict]:
    """One job: an agent per node, each in its own mount namespace with its copy at ``mount``."""
    out = tempfile.mkdtemp(prefix="distshard-s2-out-")
    port = _free_port()
    agents = []
    for node, copy in enumerate(copies):
        torchrun = (f"{sys.executable} -m torch.distributed.run --nnodes={len(copies)} "
                    f"--nproc-per-node={ranks_per_node} --node-rank={node} "
                    f"--master-addr=127.0.0.1 --master-port={port} "
                    f"{os.path.abspath(__file__)} --worker {loader} {mode} {mount} {out}")
        inner = f"mount --bind {copy} {mount} && exec {torchrun}"
        command = f"{cap.enter_command()} && exec unshare -m sh -c '{inner}'"
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
        agents.append(subprocess.Popen(["sh", "-c", command], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    logs = []
    for agent in agents:
        try:
            logs.append(agent.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            raise RuntimeError(f"{loader} {mode}: no result within {timeout} s") from None
    results = []
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name)) as f:
            results.append(json.load(f))
    shutil.rmtree(out, ignore_errors=True)
    errors = [r["error"] for r in results if "error" in r]
    if errors or len(results) != len(copies) * ranks_per_node or any(a.returncode for a in agents):
        raise RuntimeError("; ".join(errors) or "\n".join(log[-400:] for log in logs))
    return results


def capped_read_rate(copy: str, cap: Cap) -> float:
    """Cold sequential read of one copy inside the capped cgroup (bytes/second)."""
    evict(copy)
    files = " ".join(os.path.join(copy, f) for f in sorted(os.listdir(copy)))
    started = time.perf_counter()
    subprocess.run(["sh", "-c", f"{cap.enter_command()} && cat {files} > /dev/null"], check=True)
    return _folder_bytes(copy) / (time.perf_counter() - started)


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


# Where a rank's load time goes: (label, file, function) summed over the profile, and the
# time the node image's main thread waits for its own readers.
PHASES = [("load, as the harness times it", "compare.py", "_load"),
          ("plan: validate, plan, agree, check node copies", "loader.py", "_plan"),
          ("allocate (and open the node image)", "loader.py", "_allocate"),
          ("node image route", "node_image.py", "move"),
          ("  waiting for this rank's own reads", "threading.py", "wait"),
          ("  sending and receiving across nodes", "comm.py", "exchange"),
          ("  barrier: every node's image complete", "comm.py", "barrier"),
          ("  mapping the image", "node_image.py", "_map"),
          ("own rows route (this rank's reads)", "own_rows.py", "move"),
          ("materialise and agree", "loader.py", "_prepare_commit"),
          ("touch every parameter byte", "compare.py", "<genexpr>")]


def profile_table(folder: str) -> str:
    """Each profiled rank's time per phase (:data:`PHASES`), in seconds."""
    lines = []
    for name in sorted(os.listdir(folder)):
        stats = pstats.Stats(os.path.join(folder, name)).stats
        cells = []
        for label, file, function in PHASES:
            total = 0.0
            for (path, _, func), (_, _, _, cumulative, callers) in stats.items():
                if not (path.endswith(file) and func == function):
                    continue
                if label.startswith("  "):  # only what the node image route called
                    total += sum(c[3] for (cpath, _, _), c in callers.items()
                                 if cpath.endswith("node_image.py"))
                else:
                    total += cumulative
            cells.append(f"  {label:<50} {total:6.2f} s")
        lines.append(name.removesuffix(".prof") + "\n" + "\n".join(cells))
    return "\n".join(lines)


def why_not() -> str | None:
    """Why this machine cannot run S2, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces and a cgroup read cap)"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "needs unshare(1) and mount(8)"
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        return "unshare -m is not permitted here"
    return None


def main() -> int:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--cap-mbps", type=float, default=200, help="storage read cap, MB/s")
    parser.add_argument("--modes", nargs="+", default=["replicated", "sharded"])
    parser.add_argument("--loaders", nargs="+", default=LOADERS)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json")
    parser.add_argument("--chart", help="write a PNG chart here")
    parser.add_argument("--profile", action="store_true",
                        help="profile every rank (cProfile) and print where its time went")
    args = parser.parse_args()
    reason = why_not()
    if reason:
        print(f"S2 skipped: {reason}")
        return 0
    ckpt = sample_checkpoint(args.checkpoint, args.size)
    size = _folder_bytes(ckpt)
    work = tempfile.mkdtemp(prefix="distshard-s2-")
    copies = []
    for node in range(args.nodes):  # each node's own copy: separate inodes, separate page cache,
        copies.append(os.path.join(work, f"node{node}"))  # made later (times not kept, as by cp)
        shutil.copytree(ckpt, copies[-1], copy_function=shutil.copyfile)
    if args.profile:
        os.environ["DISTSHARD_S2_PROFILE"] = os.path.join(work, "profiles")
        os.makedirs(os.environ["DISTSHARD_S2_PROFILE"])
    mount = os.path.join(work, "checkpoint")
    os.makedirs(mount)
    try:
        cap = Cap(copies[0], int(args.cap_mbps * 1e6))
    except OSError as e:
        print(f"S2 skipped: {e}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    rows = []
    try:
        rate = capped_read_rate(copies[0], cap)
        bound = size / (args.cap_mbps * 1e6)
        world = args.nodes * args.ranks_per_node
        print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB; {args.nodes} nodes x "
              f"{args.ranks_per_node} ranks; storage cap {args.cap_mbps:.0f} MB/s (one cold "
              f"reader measured {rate / 1e6:.0f} MB/s); bound {bound:.2f} s")
        print(HEADER)
        for mode in args.modes:
            block = []
            for loader in args.loaders:
                for copy in copies:
                    evict(copy)
                row = dict(scenario="S2", mode=mode, ranks=world, loader=loader)
                block.append(measure(row, lambda: run_job(
                    loader, mode, copies, mount, args.ranks_per_node, cap, args.timeout)))
            finish_block(block, bound)
            rows += block
        if args.profile:
            print("where each rank's time went (cProfile, cumulative):")
            print(profile_table(os.environ["DISTSHARD_S2_PROFILE"]))
    finally:
        cap.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(checkpoint_bytes=size, nodes=args.nodes, cap_mbps=args.cap_mbps,
                           capped_read_rate=rate, bound_seconds=bound, rows=rows), f, indent=1)
    if args.chart:
        chart(rows, args.chart, f"S2, {args.nodes} nodes on storage capped at "
              f"{args.cap_mbps:.0f} MB/s: {size / 1e9:.2f} GB checkpoint, cold")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
    sys.exit(main())
