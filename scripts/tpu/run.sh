#!/usr/bin/env bash
# Starts the same command on every worker, detached, each appending to $LOG_DIR/train.log.
# Usage: scripts/tpu/run.sh -- python scripts/train.py --config experiments/coco_r50_fpn_1x.py \
#            --workdir gs://my-bucket/r50_1x --config.data.train_images=gs://my-bucket/coco/...
#
# JAX finds the other workers by itself on a TPU slice (jax.distributed is initialised from the
# TPU metadata), so no rank flags are needed. The workdir must be one place every worker sees:
# a gs:// bucket (read and written directly), or a folder at the same path on every worker (a
# Filestore/NFS mount): all hosts write one checkpoint together. Re-running the same command
# after a preemption or a stop resumes from the last checkpoint.
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ $# -eq 0 ]]; then
  echo "usage: $0 -- python scripts/train.py --config ... --workdir ..." >&2
  exit 2
fi
printf -v cmd '%q ' "$@"
# First every worker checks that its last run has ended; if one has not, none starts (two runs
# would share the workdir, the first would lose its pid file so stop.sh could not reach it,
# and a partial start would wait forever for the missing hosts). The log is appended to. A pid
# file whose process is gone, whose pid now names another process (start time differs) or that
# holds no start time is stale and ignored.
on_all_workers "$WORKER_FNS
  if pid=\$(live_run_pid $LOG_PATH/pid); then
    echo \"worker \$(hostname): the last run (pid \$pid) is still going;\" \
      \"scripts/tpu/stop.sh first\" >&2
    exit 1
  fi"
on_all_workers "$WORKER_FNS
  set -e; mkdir -p $LOG_PATH; cd $REPO_DIR
  source ~/mrcnn_jax_venv/bin/activate
  echo \"=== run.sh started \$(date -u +%Y-%m-%dT%H:%M:%SZ)\" >> $LOG_PATH/train.log
  nohup $cmd >> $LOG_PATH/train.log 2>&1 < /dev/null &
  echo \"\$! \$(proc_start \$! || true)\" > $LOG_PATH/pid
  echo \"worker \$(hostname): started pid \$!\""
echo "follow with: scripts/tpu/logs.sh   (worker 0)   or   scripts/tpu/logs.sh all"
