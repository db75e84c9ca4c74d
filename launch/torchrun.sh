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
  MAX_RESTARTS    restarts within RESTART_WINDOW before giving up (exit 138)     (3 with a rendezvous, 0 standalone)
  RESTART_WINDOW  seconds a restart counts against MAX_RESTARTS                  (3600)
  RESTART_BACKOFF seconds before a restart, doubling with each in the window     (30)
  TRAIN_MODULE    the Python module torchrun runs                                (pipeline.train)
  TORCHRUN        the torchrun executable                                        (torchrun)
Under the Kubeflow training operator the PET_NNODES, PET_NPROC_PER_NODE, PET_RDZV_ENDPOINT and
PET_MAX_RESTARTS it sets are the defaults. In a pod of an Indexed Job (JOB_COMPLETION_INDEX set) pod 0
hosts the rendezvous store.

Exit status: 0 when the run finished; 128+signal after SIGTERM/SIGINT, which go straight to the trainer
processes (they checkpoint and exit; torchrun alone would kill them after 30 s); a trainer's own error
code (1 crashed or diverged, 2 bad config) without a restart. When a trainer exits 138 (a rank on another
node was stopped or lost) or torchrun fails without a trainer error (rendezvous, a killed trainer), the
whole torchrun starts again after RESTART_BACKOFF and meets the other nodes in a fresh rendezvous; the
trainers resume from the newest checkpoint. Past the budget it exits 138, retryable for a scheduler.
Each trainer reports its code in \$EXIT_STATUS_DIR/rank-N (pipeline.train does; a TRAIN_MODULE of your
own must too, or its finished run reads as a failed start).

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
RESTART_WINDOW=${RESTART_WINDOW:-3600}
RESTART_BACKOFF=${RESTART_BACKOFF:-30}
if [[ -n "${JOB_COMPLETION_INDEX:-}" ]]; then
	# a pod of an Indexed Job: pod 0, whose DNS name is RDZV_ENDPOINT, hosts the rendezvous store, and no
	# other pod tries to (guessing from host names can pick two hosts when pods share a node)
	RDZV_CONF+=",is_host=$([[ "$JOB_COMPLETION_INDEX" == 0 ]] && echo true || echo false)"
fi

# torchrun's own --max-restarts stays 0: its in-place re-rendezvous of surviving agents with a replacement
# node proved unreliable, so this script restarts the whole torchrun instead (a fresh rendezvous round)
cmd=("$TORCHRUN" "--nproc-per-node=$NPROC_PER_NODE")
if [[ -z "$RDZV_ENDPOINT" ]]; then
	if [[ "$NNODES" != 1 ]]; then
		echo "error: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node)" >&2
		exit 2
	fi
	MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-0}}
	cmd+=(--standalone --max-restarts=0)
else
	MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}
	cmd+=("--nnodes=$NNODES" --rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$RDZV_ID"
		"--rdzv-conf=$RDZV_CONF" --max-restarts=0)
fi
cmd+=(-m "$TRAIN_MODULE" "$@")

if [[ $dry_run -eq 1 ]]; then
	printf '%q ' "${cmd[@]}"
	echo
	exit 0
fi
echo "launch/torchrun.sh: ${cmd[*]}" >&2

# Each trainer writes its exit code to $EXIT_STATUS_DIR/rank-N: torchrun reports 1 for any failure, and 0
# also when it left a rendezvous without starting a trainer.
EXIT_STATUS_DIR=$(mktemp -d)
export EXIT_STATUS_DIR
trap 'rm -rf "$EXIT_STATUS_DIR"' EXIT
RESTART_CODE=138 # pipeline/engine/preemption.py: EXIT_RESTART

# torchrun and the back-off sleep run in the background so this shell can take a termination signal at
# once and hand it to the trainer processes (torchrun's children) itself: each checkpoints, every rank
# agrees to stop, and they exit on their own time.
child=0
backing_off=0
caught=0
forward() {
	caught=$1
	if [[ $backing_off -eq 1 ]]; then
		kill "$child" 2>/dev/null || true
	else
		pkill "-$1" -P "$child" || true
	fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
wait_child() {
	local status=0
	while true; do
		if [[ $backing_off -eq 1 && "$caught" != 0 ]]; then
			kill "$child" 2>/dev/null || true # the signal came before this sleep started
		fi
		wait "$child" && status=0 || status=$?
		# `wait` also returns when a trapped signal arrives; only a finished child ends the loop
		kill -0 "$child" 2>/dev/null || break
	done
	return "$status"
}
exit_if_signalled() {
	case "$caught" in
	TERM) exit 143 ;;
	INT) exit 130 ;;
	esac
}

restart_times=() # when each restart inside the window happened (seconds since the epoch)
while true; do
	rm -f "$EXIT_STATUS_DIR"/rank-*
	"${cmd[@]}" &
	child=$!
	wait_child && status=0 || status=$?
	exit_if_signalled
	codes=$(cat "$EXIT_STATUS_DIR"/rank-* 2>/dev/null | sort -u | tr '\n' ' ' || true)
	if [[ $status -eq 0 && "$codes" == "0 " ]]; then
		exit 0
	fi
	for code in $codes; do
		if [[ $code -ne 0 && $code -ne $RESTART_CODE ]]; then
			echo "launch/torchrun.sh: a trainer exited $code: not restarting" >&2
			exit "$code"
		fi
	done
	if [[ " $codes" == *" $RESTART_CODE "* ]]; then
		reason="a trainer exited $RESTART_CODE (a rank on another node was stopped or lost)"
	else
		reason="torchrun exited $status without a trainer error (rendezvous failed, or a trainer was killed)"
	fi
	now=$(date +%s)
	kept=()
	for t in "${restart_times[@]}"; do
		if ((now - t < RESTART_WINDOW)); then kept+=("$t"); fi
	done
	restart_times=("${kept[@]}")
	n=${#restart_times[@]}
	if ((n >= MAX_RESTARTS)); then
		echo "launch/torchrun.sh: $reason; $n restarts within ${RESTART_WINDOW}s (MAX_RESTARTS): giving up, exit $RESTART_CODE" >&2
		exit "$RESTART_CODE"
	fi
	delay=$((RESTART_BACKOFF * (1 << n) < 600 ? RESTART_BACKOFF * (1 << n) : 600))
	restart_times+=("$now")
	export RESTART_REASON="launch/torchrun.sh restart $((n + 1)) of $MAX_RESTARTS in ${RESTART_WINDOW}s after: $reason"
	echo "$RESTART_REASON; starting again in ${delay}s" >&2
	backing_off=1
	sleep "$delay" &
	child=$!
	wait_child || true
	backing_off=0
	exit_if_signalled
done
