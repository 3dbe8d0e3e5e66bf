#!/usr/bin/env bash
# Follows the training log. Usage: scripts/tpu/logs.sh [WORKER|all] [LINES]
#   scripts/tpu/logs.sh        tail -f worker 0 (the only one writing progress and summaries)
#   scripts/tpu/logs.sh 3      tail -f worker 3
#   scripts/tpu/logs.sh all    the last LINES (default 20) lines of every worker, once
source "$(dirname "$0")/common.sh"
worker="${1:-0}"
lines="${2:-20}"
if [[ "$worker" == "all" ]]; then
  on_all_workers "echo \"== \$(hostname)\"; tail -n $lines $LOG_PATH/train.log"
else
  on_worker "$worker" "tail -n $lines -f $LOG_PATH/train.log"
fi
