#!/usr/bin/env bash
# One node of the multi-node job: a torchrun agent with NPROC_PER_NODE gloo ranks, joining a
# static rendezvous on MASTER_ADDR:MASTER_PORT (the agent with node rank 0 hosts the store).
#
#   MASTER_ADDR=node0 MASTER_PORT=29500 CHECKPOINT=/ckpt/tiny-llama docker/node.sh NODE_RANK
#
# The same script runs in docker/compose.yaml (one container per node) and in
# tests/test_docker_job.py (two agents on one machine, MASTER_ADDR=127.0.0.1).
set -euo pipefail
node_rank="${1:?usage: node.sh NODE_RANK}"
here="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-2}" --nproc-per-node="${NPROC_PER_NODE:-2}" --node-rank="$node_rank" \
    --master-addr="${MASTER_ADDR:-node0}" --master-port="${MASTER_PORT:-29500}" \
    "$here/job.py" --checkpoint "${CHECKPOINT:-/ckpt/tiny-llama}"
