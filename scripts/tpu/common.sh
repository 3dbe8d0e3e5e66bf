# Shared settings of the TPU launch kit; sourced by the other scripts, not run.
#
# Set these in the environment (or a file you source) before calling any script:
#   TPU_NAME          name of the TPU VM / pod slice            (required)
#   ZONE              e.g. us-central2-b, europe-west4-a         (required)
#   ACCELERATOR_TYPE  e.g. v4-8 (1 host), v4-32 (4 hosts), v5litepod-16, v5p-32
#   RUNTIME_VERSION   TPU software version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite
#   PROJECT_ID        Google Cloud project (default: gcloud's configured project)
#   REPO_DIR          where the code lives on every worker (default: ~/mrcnn_jax)
#   LOG_DIR           where run.sh writes each worker's log (default: ~/mrcnn_jax_logs)
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM or pod slice name)}"
: "${ZONE:?set ZONE (e.g. us-central2-b)}"
REPO_DIR="${REPO_DIR:-mrcnn_jax}"     # relative to the worker's home directory
LOG_DIR="${LOG_DIR:-mrcnn_jax_logs}"   # relative to the worker's home directory, or absolute
# The log folder as the worker's shell reads it ($HOME expanded there, not here).
case "$LOG_DIR" in
  /*) LOG_PATH="$LOG_DIR" ;;
  *) LOG_PATH="\$HOME/$LOG_DIR" ;;
esac

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "${PROJECT_ID:-}" ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT_ID")
fi

# Shell functions for the worker side, prepended to a remote command (single-quoted: expanded
# there). A pid file holds "PID START", START being the process's start time in clock ticks since
# boot (field 22 of /proc/PID/stat): a pid alone may have been reused by an unrelated process.
#   proc_start PID    prints PID's start time; fails if there is no such process
#   live_run_pid FILE prints the pid FILE names if that very process still runs; fails otherwise
WORKER_FNS='proc_start() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  set -- ${stat##*) }  # the fields after the command name, which may hold spaces
  echo "${20}"
}
live_run_pid() {
  local pid="" start=""
  read -r pid start 2>/dev/null < "$1" || [[ -n "$pid" ]] || return 1
  [[ "$pid" =~ ^[0-9]+$ && -n "$start" && "$(proc_start "$pid")" == "$start" ]] || return 1
  echo "$pid"
}
'

# Runs a shell command on every worker of the slice (in parallel; gcloud waits for all).
on_all_workers() {
  "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

# Runs a shell command on one worker (default 0).
on_worker() {
  local worker="$1"; shift
  "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" --command="$1"
}
