#!/usr/bin/env bash
# tools/dist_run.sh SCRIPT NPROC ARGS...: run tools/SCRIPT in NPROC processes on this node
# with torchrun and --launcher pytorch (gloo without CUDA, nccl with it). From the
# environment: NNODES (nodes in the run, default 1), NODE_RANK (this node's, 0..NNODES-1,
# default 0), MASTER_ADDR and PORT (node 0's address, default 127.0.0.1 but required when
# NNODES > 1, and a free port there, default 29500: the same on every node), PYTHON.
# With NNODES > 1 it runs on every node; this node's ranks are NODE_RANK * NPROC + 0..NPROC-1.
set -euo pipefail
if [[ $# -lt 2 || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: tools/dist_run.sh SCRIPT NPROC [args...]  (NPROC: a positive integer)" >&2
    exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ ! "$NNODES" =~ ^[1-9][0-9]*$ || ! "$NODE_RANK" =~ ^(0|[1-9][0-9]*)$ ]] \
        || (( NODE_RANK >= NNODES )); then
    echo "tools/dist_run.sh: NNODES=$NNODES NODE_RANK=$NODE_RANK: NNODES must be a" \
        "positive integer and NODE_RANK one of 0..NNODES-1" >&2
    exit 2
fi
if (( NNODES > 1 )) && [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "tools/dist_run.sh: NNODES=$NNODES: set MASTER_ADDR to node 0's address, the" \
        "same on every node (127.0.0.1 when all the nodes are this machine)" >&2
    exit 2
fi
SCRIPT=$1
NPROC=$2
shift 2
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$(dirname "$0")/$SCRIPT" "$@" --launcher pytorch
