#!/usr/bin/env bash
# Deletes the TPU VM / pod slice (checkpoints in a gs:// workdir are kept).
# Usage: scripts/tpu/delete.sh
source "$(dirname "$0")/common.sh"
"${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
