#!/usr/bin/env bash
# Stops training on every worker with SIGTERM: the hosts agree on a step, save a checkpoint
# there and exit 0 (what a preemption notice does). run.sh with the same command resumes.
# Usage: scripts/tpu/stop.sh [--kill]     (--kill: SIGKILL, no checkpoint; the next start resumes
#                                          from the last complete checkpoint)
source "$(dirname "$0")/common.sh"
signal=TERM
if [[ "${1:-}" == "--kill" ]]; then signal=KILL; fi
# Only the process run.sh started (its pid file), never other Python jobs on the worker.
on_all_workers "pid=\$(cat $LOG_PATH/pid 2>/dev/null || true)
  if [[ -n \"\$pid\" ]] && kill -$signal \"\$pid\" 2>/dev/null; then
    echo \"\$(hostname): sent SIG$signal to \$pid\"
  else
    echo \"\$(hostname): nothing running\"
  fi"
