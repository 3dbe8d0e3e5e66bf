#!/usr/bin/env bash
# Copies this checkout to every worker and installs it with JAX for TPU.
# Usage: scripts/tpu/setup.sh        (run from the repository root; re-run after code changes)
#
# The code is shipped as `git archive HEAD` (committed files only), so every worker runs the same
# commit; its hash is printed and written to $REPO_DIR/COMMIT on each worker.
source "$(dirname "$0")/common.sh"
cd "$(git rev-parse --show-toplevel)"

commit="$(git rev-parse --short HEAD)"
if ! git diff --quiet HEAD; then
  echo "warning: uncommitted changes are NOT shipped (workers get $commit)" >&2
fi
archive="$(mktemp -t mrcnn_jax.XXXXXX.tar.gz)"
trap 'rm -f "$archive"' EXIT
git archive --format=tar.gz -o "$archive" HEAD

"${GCLOUD_TPU[@]}" scp "$archive" "$TPU_NAME":mrcnn_jax.tar.gz "${GCLOUD_FLAGS[@]}" --worker=all
on_all_workers "set -e
  rm -rf $REPO_DIR && mkdir -p $REPO_DIR && tar -xzf mrcnn_jax.tar.gz -C $REPO_DIR
  echo $commit > $REPO_DIR/COMMIT
  python3 -m venv ~/mrcnn_jax_venv
  ~/mrcnn_jax_venv/bin/pip install -q --upgrade pip
  ~/mrcnn_jax_venv/bin/pip install -q -e ./$REPO_DIR 'jax[tpu]'
  ~/mrcnn_jax_venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count())'"
echo "installed $commit on every worker of $TPU_NAME"
