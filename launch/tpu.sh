#!/usr/bin/env bash
# Run `jaxtune train` on a Cloud TPU VM or pod slice.
#
# Creates the TPU (or reuses it), ships this checkout plus the config to every worker (a `git archive` tarball:
# committed files and tracked edits, never untracked junk), installs it with pip, runs the same command on all
# workers (each is one jax process; jaxtune's init_distributed finds the others through the TPU metadata),
# and streams worker 0's log (only process 0 logs). With --restarts N, a run that dies because the TPU was
# preempted is retried on a recreated TPU, and one that a SIGTERM stopped (jaxtune exits 143) is retried too;
# jaxtune resumes from its last checkpoint by itself (training.resume=auto), so output_dir must be on storage that outlives the VM and that every worker sees:
# a Cloud Storage bucket mounted on each worker (gcsfuse), or a shared filesystem (Filestore / NFS).
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG --config CONFIG.yaml --zone ZONE [options] [-- jaxtune train overrides...]

Create or reuse a TPU VM, copy jaxtune to every worker, run 'jaxtune train CONFIG' on all of them, stream
worker 0's log.

Options:
  --config FILE            jaxtune YAML config (required); shipped to the workers as run/<name>.yaml
  --zone ZONE              e.g. us-central2-b (required, or \$CLOUDSDK_COMPUTE_ZONE)
  --name NAME              TPU name (default: jaxtune-\$USER)
  --accelerator-type TYPE  v4-8, v4-32, v5p-128, v5litepod-16, v6e-8 ... (default: v4-8)
  --version VERSION        TPU runtime (default per generation: tpu-ubuntu2204-base for v2-v4,
                           v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --project PROJECT        GCP project (default: gcloud's configured project)
  --queued                 create through 'gcloud compute tpus queued-resources create' (waits for capacity)
  --preemptible            preemptible TPU (not with --queued)
  --spot                   Spot TPU
  --restarts N             after a preemption, recreate the TPU and rerun up to N times (default: 0)
  --dry-run                print every command instead of running it
  -h, --help               this help

Everything after '--' is passed to 'jaxtune train' (dotted overrides, e.g. training.max_steps=100).

Examples:
  $PROG --config configs/sft/llama3_lora.yaml --zone us-central2-b --accelerator-type v4-32 --dry-run
  $PROG --config my.yaml --zone us-east5-a --accelerator-type v5p-128 --queued --spot --restarts 5 \\
      -- output_dir=/mnt/gcs/run1      # a bucket mounted on every worker (gcsfuse): survives preemption

Stop a run: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command='pkill -INT -f "jaxtune train"'
  (SIGINT: jaxtune checkpoints and exits 130, which is not restarted; SIGTERM exits 143, which --restarts reruns)
Delete the TPU: gcloud compute tpus tpu-vm delete NAME --zone ZONE   (queued: queued-resources delete --force)
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="" ZONE="${CLOUDSDK_COMPUTE_ZONE:-}" NAME="" ACCEL="v4-8" VERSION="" PROJECT=""
QUEUED=0 PREEMPTIBLE=0 SPOT=0 RESTARTS=0 DRY_RUN=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --restarts) need_value "$@"; RESTARTS=$2; shift 2 ;;
    --config=* | --zone=* | --name=* | --accelerator-type=* | --version=* | --project=* | --restarts=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --queued) QUEUED=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help; arguments for jaxtune train go after '--')" ;;
  esac
done

# --- validate everything before touching the cloud --------------------------------------------------------
[[ -n $CONFIG ]] || die "--config CONFIG.yaml is required"
[[ -f $CONFIG && -r $CONFIG ]] || die "config file '$CONFIG' does not exist or is not readable"
[[ -n $ZONE ]] || die "--zone is required (e.g. --zone us-central2-b; TPU zones: gcloud compute tpus locations list)"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  die "zone '$ZONE' is not a zone name like us-central2-b or europe-west4-a (a region such as us-central2 is not enough)"
[[ $ACCEL =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "accelerator type '$ACCEL' is not like v4-32, v5p-128 or v5litepod-16"
[[ $RESTARTS =~ ^[0-9]+$ ]] || die "--restarts must be a non-negative integer, got '$RESTARTS'"
((PREEMPTIBLE && SPOT)) && die "choose one of --preemptible and --spot"
((PREEMPTIBLE && QUEUED)) && die "queued resources have no --preemptible; use --spot"
if [[ -z $NAME ]]; then
  NAME="jaxtune-$(printf '%s' "${USER:-tpu}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-')"
fi
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "name '$NAME' must be lowercase letters, digits and hyphens, starting with a letter"
if [[ -z $VERSION ]]; then
  case $ACCEL in
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud is not on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run"
  git -C "$REPO" rev-parse --verify -q HEAD >/dev/null || die "$REPO has no git commit; tpu.sh ships the checkout with git archive"
fi

GC=(gcloud compute tpus)
LOC=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOC+=(--project="$PROJECT")
REMOTE_CONFIG="run/$(basename "$CONFIG")"
# shellcheck disable=SC2088  # the remote shell expands the tilde
LOG='~/jaxtune-train.log'

# --- the TPU ----------------------------------------------------------------------------------------------
node_state() { "${GC[@]}" tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || true; }
queue_state() { "${GC[@]}" queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)' 2>/dev/null || true; }

create_tpu() {
  local kind=()
  ((PREEMPTIBLE)) && kind=(--preemptible)
  ((SPOT)) && kind=(--spot)
  if ((QUEUED)); then
    run "${GC[@]}" queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" ${kind[@]+"${kind[@]}"}
  else
    run "${GC[@]}" tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION" ${kind[@]+"${kind[@]}"}
  fi
}

delete_tpu() {
  if ((QUEUED)); then
    run "${GC[@]}" queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run "${GC[@]}" tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

# Queued requests wait for capacity; poll until the slice is ACTIVE (no time limit: that is the point of queuing).
wait_active() {
  local state="" last=""
  while :; do
    state=$(queue_state)
    [[ $state == ACTIVE ]] && return 0
    case $state in
      FAILED | SUSPENDED) die "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME --zone $ZONE" ;;
    esac
    [[ $state != "$last" ]] && echo "$PROG: queued resource $NAME: ${state:-not visible yet}; waiting..." >&2
    last=$state
    sleep 30
  done
}

ensure_tpu() {
  if ((DRY_RUN)); then
    if ((QUEUED)); then show "${GC[@]}" queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'; else
      show "${GC[@]}" tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)'; fi
    echo "# if the TPU does not exist (or was preempted: delete it first):"
    create_tpu
    if ((QUEUED)); then echo "# then poll the describe command above every 30 s until it prints ACTIVE"; fi
    return
  fi
  local state
  if ((QUEUED)); then
    state=$(queue_state)
    case $state in
      ACTIVE)
        if [[ $(node_state) =~ ^(PREEMPTED|TERMINATED)$ ]]; then delete_tpu; create_tpu; else
          echo "$PROG: reusing queued resource $NAME" >&2
        fi
        ;;
      "") create_tpu ;;
      FAILED | SUSPENDED | SUSPENDING) delete_tpu; create_tpu ;;
    esac
    wait_active
  else
    state=$(node_state)
    case $state in
      READY) echo "$PROG: reusing TPU $NAME ($ACCEL in $ZONE)" >&2 ;;
      "") create_tpu ;;
      PREEMPTED | TERMINATED) delete_tpu; create_tpu ;;
      STOPPED) run "${GC[@]}" tpu-vm start "$NAME" "${LOC[@]}" ;;
      *) die "TPU $NAME is $state; wait for it to be READY or delete it: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE" ;;
    esac
  fi
}

# --- ship the code ----------------------------------------------------------------------------------------
deploy() {
  local ref tarball
  # `git stash create` makes a commit of the tracked edits without touching the work tree or the stash list,
  # so what runs is what you see; it prints nothing on a clean tree.
  ref=$(git -C "$REPO" stash create 2>/dev/null || true)
  ref=${ref:-HEAD}
  if ((DRY_RUN)); then tarball=/tmp/jaxtune-XXXXXX.tar.gz; else
    tarball=$(mktemp /tmp/jaxtune-XXXXXX)
    TMP_FILES+=("$tarball")
  fi
  run git -C "$REPO" archive --format=tar.gz --prefix=jaxtune/run/ --add-file="$CONFIG" --prefix=jaxtune/ \
    -o "$tarball" "$ref"
  run "${GC[@]}" tpu-vm scp "$tarball" "$NAME":jaxtune.tar.gz --worker=all "${LOC[@]}"
  # Replace only what the tarball ships (its top-level entries under ~/jaxtune): a relative output_dir (runs/...)
  # of the previous attempt on this TPU stays, so a restart resumes from its checkpoints instead of step 0.
  # jax[tpu] pulls libtpu; the package's own dependency is plain (CPU) jax.
  local replace="mkdir -p ~/jaxtune && cd ~/jaxtune && tar -tzf ~/jaxtune.tar.gz | cut -d/ -f2 | sort -u | grep -v '^$' | xargs -r rm -rf --"
  run "${GC[@]}" tpu-vm ssh "$NAME" --worker=all "${LOC[@]}" --command="rm -f $LOG && $replace && tar -xzf ~/jaxtune.tar.gz -C ~ && python3 -m pip install -q -e . \"jax[tpu]\""
}

# The run's output_dir: the last output_dir= override, else the config's top-level key, else jaxtune's default.
output_dir() {
  local arg dir=""
  dir=$(sed -n -E "s/^output_dir:[[:space:]]*['\"]?([^'\"#]*[^'\"#[:space:]])['\"]?[[:space:]]*(#.*)?$/\1/p" "$CONFIG" | tail -n 1)
  for arg in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do [[ $arg == output_dir=* ]] && dir=${arg#output_dir=}; done
  printf '%s' "${dir:-runs/default}"
}

# --- run --------------------------------------------------------------------------------------------------
train() {
  local remote arg rc=0 tail_pid
  # `python3 -m jaxtune`: pip's console scripts land in ~/.local/bin, which non-login ssh shells may not have.
  remote="cd ~/jaxtune && python3 -m jaxtune train $(quote "$REMOTE_CONFIG")"
  for arg in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do remote+=" $(quote "$arg")"; done
  remote+=" > $LOG 2>&1"
  local all=("${GC[@]}" tpu-vm ssh "$NAME" --worker=all "${LOC[@]}" --command="$remote")
  local follow=("${GC[@]}" tpu-vm ssh "$NAME" --worker=0 "${LOC[@]}" --command="tail -n +1 -F $LOG")
  if ((DRY_RUN)); then
    echo "# every worker runs the same command (in the background), worker 0's log is streamed:"
    show "${all[@]}"
    show "${follow[@]}"
    return 0
  fi
  "${all[@]}" &
  local train_pid=$!
  "${follow[@]}" &
  tail_pid=$!
  BG_PIDS=("$train_pid" "$tail_pid")
  wait "$train_pid" || rc=$?
  kill "$tail_pid" 2>/dev/null || true
  wait "$tail_pid" 2>/dev/null || true
  BG_PIDS=()
  return "$rc"
}

TMP_FILES=()
BG_PIDS=()
cleanup() {
  local pid f
  for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for f in ${TMP_FILES[@]+"${TMP_FILES[@]}"}; do rm -f "$f"; done
  return 0
}
trap cleanup EXIT

if ((DRY_RUN)); then
  echo "# $PROG dry run: TPU $NAME ($ACCEL, $VERSION) in $ZONE, config $CONFIG"
fi
OUT_DIR=$(output_dir)
if [[ $OUT_DIR != /* ]]; then
  echo "$PROG: warning: output_dir '$OUT_DIR' is relative: it lives on each worker's own disk (~/jaxtune/$OUT_DIR)." \
    "A rerun on this TPU resumes from it, but a preempted TPU is recreated without it (training starts again at" \
    "step 0) and a multi-host run's checkpoints are split across the workers' disks: give output_dir on storage" \
    "every worker mounts (-- output_dir=/mnt/gcs/run1, a gcsfuse bucket, or NFS / Filestore)." >&2
fi
attempt=0
while :; do
  ensure_tpu
  deploy
  rc=0
  train || rc=$?
  if ((DRY_RUN)); then
    if ((RESTARTS)); then
      echo "# if the run fails and the TPU was preempted (up to $RESTARTS times): delete, then all of the above again:"
      delete_tpu
    fi
    exit 0
  fi
  ((rc == 0)) && { echo "$PROG: training finished on $NAME" >&2; exit 0; }
  # A preempted TPU shows as PREEMPTED (or is gone); a preempted queued resource as SUSPENDED / FAILED.
  # ensure_tpu deletes and recreates it on the next pass.
  state=$(node_state)
  qstate=""
  if ((QUEUED)); then qstate=$(queue_state); fi
  # jaxtune exits 143 (128 + SIGTERM) when a SIGTERM stopped it after checkpointing, e.g. a maintenance event on
  # a TPU that stays READY: that is restarted too (on the same TPU). Ctrl-C / SIGINT (130) is a deliberate stop.
  why=""
  if [[ $state =~ ^(PREEMPTED|TERMINATED)?$ || $qstate =~ ^(SUSPENDED|SUSPENDING|FAILED)$ ]]; then
    why="TPU $NAME was preempted (${state:-gone})"
  elif ((rc == 143)); then
    why="training was stopped by SIGTERM (exit 143) on TPU $NAME ($state)"
  fi
  if [[ -n $why ]]; then
    if ((attempt < RESTARTS)); then
      attempt=$((attempt + 1))
      echo "$PROG: $why; restart $attempt of $RESTARTS, resuming from the last checkpoint" >&2
      continue
    fi
    echo "$PROG: $why and no restarts are left (--restarts $RESTARTS)" >&2
  else
    echo "$PROG: training failed (exit $rc) on a healthy TPU ($state); not restarting. Log: $LOG on worker 0" >&2
  fi
  exit "$rc"
done
