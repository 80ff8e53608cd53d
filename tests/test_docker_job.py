"""The docker/ multi-node job, run outside Docker: two torchrun agents (node ranks 0 and 1, two
ranks each) started by docker/node.sh on this machine, as the containers of docker/compose.yaml
start them. Also checks that the compose file and Dockerfile say what the job needs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DEADLINE = 150
LINE = re.compile(r"^distshard-job rank=(\d+) world=(\d+) node=(\d+) local_rank=(\d+) nodes=(\d+) "
                  r"tensors=(\d+) bytes_read=(\d+) per_node_cluster=(\S+) per_node_node=(\S+) "
                  r"replicated=(\S+) fsdp2=(\S+)", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill each agent's whole process group (the agent and its ranks)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def _run_agents(checkpoint: str, tmp_path: Path) -> tuple[list[int], str]:
    repo = str(DOCKER.parent)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               CHECKPOINT=checkpoint, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    env.pop("DISTSHARD_NODE", None)  # the node name must come from torchrun's GROUP_RANK
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = []
    try:
        for node, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(["bash", str(DOCKER / "node.sh"), str(node)],
                                              stdout=out, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        deadline = time.monotonic() + DEADLINE
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        timed_out = any(p.poll() is None for p in procs)
    finally:
        _stop(procs)
    text = "\n".join(f"--- node {n} ---\n{log.read_text()}" for n, log in enumerate(logs))
    assert not timed_out, f"the agents did not finish within {DEADLINE} s; killed:\n{text[-6000:]}"
    return [p.returncode for p in procs], text


@pytest.mark.multiprocess
def test_two_agents_load_bitwise_equal(tmp_path):
    checkpoint = str(tmp_path / "tiny-llama")
    made = subprocess.run([sys.executable, str(DOCKER / "make_checkpoint.py"), checkpoint],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert made.returncode == 0, made.stderr[-3000:]
    assert os.path.isfile(os.path.join(checkpoint, "model.safetensors.index.json"))

    codes, text = _run_agents(checkpoint, tmp_path)
    assert codes == [0, 0], f"agents exited {codes}:\n{text[-6000:]}"
    rows = {int(m[0]): m for m in LINE.findall(text)}
    assert sorted(rows) == [0, 1, 2, 3], text[-6000:]
    for rank, (_, world, node, local, nodes, tensors, read, cluster, per_node, replicated,
               fsdp2) in rows.items():
        assert (world, nodes) == ("4", "2"), rows[rank]
        assert (int(node), int(local)) == divmod(rank, 2), rows[rank]  # torchrun's rank order
        assert replicated == fsdp2 == "bitwise-equal", rows[rank]
        assert int(tensors) > 0
    # locality="cluster": each byte read once across the job, every rank a share
    reads = [int(rows[r][6]) for r in range(4)]
    tensor_bytes = 0
    for f in os.listdir(checkpoint):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(checkpoint, f), "pt") as st:
                tensor_bytes += sum(st.get_tensor(k).nbytes for k in st.keys())
    assert all(n > 0 for n in reads) and sum(reads) == tensor_bytes, (reads, tensor_bytes)
    cluster = [int(n) for n in rows[0][7].split(",")]
    assert len(cluster) == 2 and sum(cluster) == tensor_bytes and 0 < min(cluster), cluster
    # locality="node": each node read the whole checkpoint once
    assert [int(n) for n in rows[0][8].split(",")] == [tensor_bytes, tensor_bytes], rows[0]


def test_compose_file_describes_the_job():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; cannot parse compose.yaml")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"init", "node0", "node1"} <= set(services)
    mount = "checkpoint:/ckpt"
    assert mount in services["init"]["volumes"]
    assert "make_checkpoint.py" in " ".join(services["init"]["command"])
    for rank, name in enumerate(("node0", "node1")):
        node = services[name]
        assert node["command"] == ["docker/node.sh", str(rank)]
        assert mount in node["volumes"]
        assert node["environment"]["MASTER_ADDR"] == "node0"
        assert node["environment"]["CHECKPOINT"].startswith("/ckpt/")
        assert node["shm_size"] == "1gb"
        assert node["depends_on"]["init"]["condition"] == "service_completed_successfully"
        assert node["build"]["dockerfile"] == "docker/Dockerfile"
    assert "checkpoint" in compose["volumes"]


def test_dockerfile_pins_cpu_torch():
    text = (DOCKER / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "--index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch" in text
    assert os.access(DOCKER / "node.sh", os.X_OK)
