#!/usr/bin/env bash
# Run `python -m pipeline.train` under torchrun on this node: one node (--standalone) or one node of many
# (c10d rendezvous, elastic). Every setting comes from an environment variable so that SLURM, Kubernetes
# and Docker all drive the same script; `--help` lists them with their defaults.
set -euo pipefail

usage() {
	cat <<EOF
usage: launch/torchrun.sh [--help] [--dry-run] --config FILE [key.sub=value ...]

Starts NPROC_PER_NODE trainer processes on this node under torchrun. Arguments after the options go to
\`python -m \$TRAIN_MODULE\` unchanged.

environment (default):
  NNODES          nodes: N, or MIN:MAX for an elastic job                        (1)
  NPROC_PER_NODE  processes on this node, one per GPU                            (GPUs seen by nvidia-smi, else 1)
  RDZV_ENDPOINT   host:port of the c10d rendezvous, on the first node            (unset: --standalone, NNODES must be 1)
  RDZV_ID         job id shared by all nodes of one job                          (\$SLURM_JOB_ID, else ssl-pretrain)
  RDZV_CONF       extra rendezvous settings, k=v,k=v                             (join_timeout=900)
  MAX_RESTARTS    worker-group restarts after a failure before giving up         (3 with a rendezvous, 0 standalone)
  TRAIN_MODULE    the Python module torchrun runs                                (pipeline.train)
  TORCHRUN        the torchrun executable                                        (torchrun)
Under the Kubeflow training operator the PET_NNODES, PET_NPROC_PER_NODE, PET_RDZV_ENDPOINT and
PET_MAX_RESTARTS it sets are the defaults.

SIGTERM/SIGINT go straight to the trainer processes (they checkpoint and exit; torchrun alone would kill
them after 30 s); the script then exits with 128+signal so an orchestrator retries the node.

examples:
  NPROC_PER_NODE=8 launch/torchrun.sh --config configs/cifar10_simclr.yaml data.train_shards=/data/shards
  NNODES=2:4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=simclr-01 \\
      launch/torchrun.sh --config configs/cifar10_simclr.yaml data.train_shards=s3://bucket/shards
EOF
}

dry_run=0
while [[ $# -gt 0 ]]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--dry-run)
		dry_run=1
		shift
		;;
	*) break ;;
	esac
done
if [[ $# -eq 0 ]]; then
	usage >&2
	exit 2
fi

gpu_count() {
	local n=0
	if command -v nvidia-smi >/dev/null 2>&1; then
		n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
	fi
	echo $((n > 0 ? n : 1))
}

NNODES=${NNODES:-${PET_NNODES:-1}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-$(gpu_count)}}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-ssl-pretrain}}
RDZV_CONF=${RDZV_CONF:-join_timeout=900}
TRAIN_MODULE=${TRAIN_MODULE:-pipeline.train}
TORCHRUN=${TORCHRUN:-torchrun}

cmd=("$TORCHRUN" "--nproc-per-node=$NPROC_PER_NODE")
if [[ -z "$RDZV_ENDPOINT" ]]; then
	if [[ "$NNODES" != 1 ]]; then
		echo "error: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node)" >&2
		exit 2
	fi
	MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-0}}
	cmd+=(--standalone "--max-restarts=$MAX_RESTARTS")
else
	MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}
	cmd+=("--nnodes=$NNODES" --rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$RDZV_ID"
		"--rdzv-conf=$RDZV_CONF" "--max-restarts=$MAX_RESTARTS")
fi
cmd+=(-m "$TRAIN_MODULE" "$@")

if [[ $dry_run -eq 1 ]]; then
	printf '%q ' "${cmd[@]}"
	echo
	exit 0
fi
echo "launch/torchrun.sh: ${cmd[*]}" >&2

# torchrun runs in the background so this shell can hand a termination signal to the trainer processes
# (its children) itself: each checkpoints, every rank agrees to stop, and they exit on their own time.
"${cmd[@]}" &
torchrun_pid=$!
caught=0
forward() {
	caught=$1
	pkill "-$1" -P "$torchrun_pid" || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
while true; do
	wait "$torchrun_pid" && status=0 || status=$?
	# `wait` also returns when a trapped signal arrives; only a finished torchrun ends the loop
	kill -0 "$torchrun_pid" 2>/dev/null || break
done
case "$caught" in
TERM) exit 143 ;;
INT) exit 130 ;;
*) exit "$status" ;;
esac
