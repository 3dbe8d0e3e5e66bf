#!/usr/bin/env bash
# Stops training on every worker with SIGTERM: the hosts agree on a step, save a checkpoint
# there and exit 0 (what a preemption notice does). run.sh with the same command resumes.
# Usage: scripts/tpu/stop.sh [--kill]     (--kill: SIGKILL, no checkpoint; the next start resumes
#                                          from the last complete checkpoint)
source "$(dirname "$0")/common.sh"
signal=TERM
if [[ "${1:-}" == "--kill" ]]; then signal=KILL; fi
# Only the process run.sh started (its pid file, pid and start time), never other jobs on the
# worker, nor a process that got the pid of a run that has ended.
on_all_workers "$WORKER_FNS
  if pid=\$(live_run_pid $LOG_PATH/pid) && kill -$signal \"\$pid\" 2>/dev/null; then
    echo \"\$(hostname): sent SIG$signal to \$pid\"
  else
    echo \"\$(hostname): nothing running\"
  fi"
