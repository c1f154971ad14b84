#!/usr/bin/env bash
# tools/dist_run.sh SCRIPT NPROC ARGS...: run tools/SCRIPT in NPROC processes on one node
# with torchrun and --launcher pytorch (gloo without CUDA, nccl with it). NNODES,
# NODE_RANK, MASTER_ADDR, PORT and PYTHON are read from the environment.
set -euo pipefail
if [[ $# -lt 2 || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: tools/dist_run.sh SCRIPT NPROC [args...]  (NPROC: a positive integer)" >&2
    exit 2
fi
SCRIPT=$1
NPROC=$2
shift 2
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$(dirname "$0")/$SCRIPT" "$@" --launcher pytorch
