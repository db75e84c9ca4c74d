#!/usr/bin/env bash
# Docker ENTRYPOINT. Trainer arguments (`--config FILE key=value ...`) start launch/torchrun.sh, which reads
# NNODES, NPROC_PER_NODE, RDZV_ENDPOINT, ... from the environment; any other command (bash, python -m
# pipeline.eval ...) runs as given, so one image serves training, evaluation and debugging.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -eq 0 || "$1" == -* ]]; then
	exec launch/torchrun.sh "$@"
fi
exec "$@"
