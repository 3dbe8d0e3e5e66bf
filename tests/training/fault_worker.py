"""Runs ``scripts/train.py`` unchanged, in this process, with one input batch poisoned (test only).

  python tests/training/fault_worker.py NAN_STEP scripts/train.py --config ... --workdir ...

The batch of the run's NAN_STEP-th step (counted from 0 in this process, so from the step the
run starts at) gets NaN ground-truth boxes before it goes to the devices. The model itself then
computes a non-finite loss from them, and the gradient poisons the parameters: what corrupt data
does to a real run. The train step is the one compiled for every other run (the poison is
outside it), so the persistent compilation cache applies. Used by tests/training/test_faults.py.
"""

from __future__ import annotations

import itertools
import os
import runpy
import sys

import numpy as np


def main() -> None:
  nan_step, script, args = int(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3:]
  from mrcnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  make_global_batch = data_lib.make_global_batch  # the loop looks it up on the module per step
  calls = itertools.count()

  def poisoned(host_batch, mesh, *a, **kw):
    if next(calls) == nan_step:
      host_batch = dict(host_batch)
      host_batch["gt_boxes"] = np.full_like(host_batch["gt_boxes"], np.nan)
    return make_global_batch(host_batch, mesh, *a, **kw)

  data_lib.make_global_batch = poisoned
  sys.argv = [script, *args]
  sys.path.insert(0, os.path.dirname(script))  # scripts import their sibling `_cli`
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
