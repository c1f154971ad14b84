#!/usr/bin/env bash
# Distributed training: tools/dist_train.sh CONFIG NPROC [train.py args...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: tools/dist_train.sh CONFIG NPROC [train.py args...]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
exec "$(dirname "$0")/dist_run.sh" train.py "$NPROC" "$CONFIG" "$@"
