#!/usr/bin/env bash
# Deletes the TPU VM / pod slice. Its local disks go with it: keep the workdir in a bucket
# (--workdir gs://...) or on a Filestore/NFS mount (see run.sh) so the checkpoints outlive it.
# Usage: scripts/tpu/delete.sh
source "$(dirname "$0")/common.sh"
"${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
