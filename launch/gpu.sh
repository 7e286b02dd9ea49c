#!/usr/bin/env bash
# Run `jaxtune train` on GPUs: one host (one process that sees every local GPU), or several nodes under SLURM.
#
# Multi-node: one task per node (`--ntasks-per-node=1`), each task one jax process driving all GPUs of its node.
# srun gives every task SLURM_PROCID / SLURM_NTASKS / SLURM_STEP_NODELIST; jaxtune's init_distributed turns
# those into jax.distributed.initialize(coordinator = first node, num_processes, process_id) and keeps all local
# GPUs visible (jax's own SLURM detection would pin each process to one GPU). --port fixes the coordinator port
# (JAX_COORDINATOR_PORT); the default is derived from the job id, like jax does.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG --config CONFIG.yaml [options] [-- jaxtune train overrides...]

Single host (default): runs 'jaxtune train CONFIG' once; JAX uses every visible GPU (the mesh comes from the
config's parallel section, data=-1 by default: plain data parallelism).
Several nodes (--nodes N > 1): runs it once per node under SLURM with srun, or writes an sbatch script.

Options:
  --config FILE          jaxtune YAML config (required)
  --gpus LIST            single host: GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES)
  --nodes N              number of nodes (default: 1)
  --gpus-per-node G      GPUs per node to ask SLURM for (default: 8)
  --partition NAME       SLURM partition
  --account NAME         SLURM account
  --time LIMIT           SLURM time limit, e.g. 24:00:00
  --job-name NAME        SLURM job name (default: jaxtune)
  --port PORT            jax coordinator port on the first node (default: derived from the job id)
  --sbatch FILE          write a batch script to FILE and submit it with sbatch, instead of running srun now
  --python PYTHON        interpreter with jaxtune installed (default: \$PYTHON or python3)
  --dry-run              print every command (and the sbatch script) instead of running it
  -h, --help             this help

Everything after '--' is passed to 'jaxtune train' (dotted overrides, e.g. training.max_steps=100).

Examples:
  $PROG --config configs/sft/llama3_lora.yaml --gpus 0,1,2,3
  $PROG --config my.yaml --nodes 4 --gpus-per-node 8 --partition gpu --dry-run
  $PROG --config my.yaml --nodes 2 --sbatch run.sbatch --time 12:00:00 -- training.max_steps=1000
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="" GPUS="" NODES=1 GPUS_PER_NODE=8 PARTITION="" ACCOUNT="" TIME="" JOB_NAME=jaxtune PORT="" SBATCH=""
PY=${PYTHON:-python3}
DRY_RUN=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
    --nodes) need_value "$@"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS_PER_NODE=$2; shift 2 ;;
    --partition) need_value "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --time) need_value "$@"; TIME=$2; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --sbatch) need_value "$@"; SBATCH=$2; shift 2 ;;
    --python) need_value "$@"; PY=$2; shift 2 ;;
    --config=* | --gpus=* | --nodes=* | --gpus-per-node=* | --partition=* | --account=* | --time=* | \
      --job-name=* | --port=* | --sbatch=* | --python=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help; arguments for jaxtune train go after '--')" ;;
  esac
done

# --- validate ---------------------------------------------------------------------------------------------
[[ -n $CONFIG ]] || die "--config CONFIG.yaml is required"
[[ -f $CONFIG && -r $CONFIG ]] || die "config file '$CONFIG' does not exist or is not readable"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be a comma-separated list of GPU indices like 0,1,2,3"
[[ -z $PORT || $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
# Absolute, so that srun tasks and batch scripts find it whatever their working directory.
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
TRAIN=("$PY" -m jaxtune train "$CONFIG" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})

if ((NODES == 1)); then
  [[ -z $SBATCH ]] || die "--sbatch is for multi-node runs (--nodes N > 1)"
  if ((!DRY_RUN)); then
    command -v "$PY" >/dev/null || die "'$PY' is not on PATH; pass --python or set PYTHON"
  fi
  if [[ -n $GPUS ]]; then
    run env CUDA_VISIBLE_DEVICES="$GPUS" "${TRAIN[@]}"
  else
    run "${TRAIN[@]}"
  fi
  exit 0
fi

[[ -z $GPUS ]] || die "--gpus is for single-host runs; with --nodes use --gpus-per-node"
SLURM_OPTS=(--nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE" --job-name="$JOB_NAME")
[[ -n $PARTITION ]] && SLURM_OPTS+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && SLURM_OPTS+=(--account="$ACCOUNT")
[[ -n $TIME ]] && SLURM_OPTS+=(--time="$TIME")
# --kill-on-bad-exit: one crashed process would leave the others blocked in a collective forever.
SRUN=(srun --kill-on-bad-exit=1)

if [[ -z $SBATCH ]]; then
  ((DRY_RUN)) || command -v srun >/dev/null ||
    die "--nodes $NODES needs SLURM but srun is not on PATH; run on a SLURM login node, or use --nodes 1"
  if [[ -n $PORT ]]; then
    run env JAX_COORDINATOR_PORT="$PORT" "${SRUN[@]}" "${SLURM_OPTS[@]}" "${TRAIN[@]}"
  else
    run "${SRUN[@]}" "${SLURM_OPTS[@]}" "${TRAIN[@]}"
  fi
  exit 0
fi

((DRY_RUN)) || command -v sbatch >/dev/null ||
  die "--sbatch needs SLURM but sbatch is not on PATH; run on a SLURM login node"
script() {
  local opt
  echo "#!/bin/bash"
  echo "# Generated by launch/$PROG: one jax process per node, each driving all of its GPUs."
  for opt in "${SLURM_OPTS[@]}"; do echo "#SBATCH $(quote "$opt")"; done
  echo "#SBATCH --output=$(quote "$JOB_NAME")-%j.out"
  echo "set -euo pipefail"
  echo "cd $(quote "$REPO")"
  [[ -n $PORT ]] && echo "export JAX_COORDINATOR_PORT=$PORT"
  show "${SRUN[@]}" "${TRAIN[@]}"
}
if ((DRY_RUN)); then
  echo "cat > $(quote "$SBATCH") <<'EOF'"
  script
  echo "EOF"
else
  script >"$SBATCH"
  echo "$PROG: wrote $SBATCH" >&2
fi
run sbatch "$SBATCH"
