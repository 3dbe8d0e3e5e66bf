#!/usr/bin/env bash
# Deletes the TPU VM / pod slice. Its local disks go with it: keep the workdir on a Filestore/NFS
# mount or a gcsfuse-mounted bucket (see run.sh) so the checkpoints outlive it.
# Usage: scripts/tpu/delete.sh
source "$(dirname "$0")/common.sh"
"${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
