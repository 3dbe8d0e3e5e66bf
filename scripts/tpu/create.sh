#!/usr/bin/env bash
# Creates a TPU VM or pod slice.  Usage: scripts/tpu/create.sh [--spot]
#
# --spot asks for Spot capacity (cheaper, preemptible): training resumes from the last checkpoint
# when you relaunch (run.sh), and a preemption notice (SIGTERM) makes every host save first.
source "$(dirname "$0")/common.sh"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v4-32)}"
: "${RUNTIME_VERSION:?set RUNTIME_VERSION (e.g. tpu-ubuntu2204-base)}"

extra=()
if [[ "${1:-}" == "--spot" ]]; then
  extra+=(--spot)
fi
"${GCLOUD_TPU[@]}" create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
