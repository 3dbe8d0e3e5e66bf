"""Runs a script (``scripts/train.py``) unchanged, in this process, with test-only faults in.

  python tests/training/fault_worker.py [--nan-step=N] [--stall=STEP:SECONDS] SCRIPT ARGS...

``--nan-step=N``: the batch of the run's N-th step (counted from 0 in this process, so from the
step the run starts at) gets NaN ground-truth boxes before it goes to the devices. The model
itself then computes a non-finite loss from them, and the gradient poisons the parameters: what
corrupt data does to a real run. The train step is the one compiled for every other run (the
poison is outside it), so the persistent compilation cache applies.

``--stall=STEP:SECONDS``: the async save of checkpoint STEP is held for SECONDS after its files
are written and before orbax commits (renames) it, with a log line when the hold begins, so a
test can kill the process mid-write at a known moment (:func:`hold_commit`, which
test_checkpoint.py also patches in directly).

Used by tests/training/test_faults.py and test_checkpoint.py; the library has no hook for either.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import runpy
import sys
import time
from typing import Callable, Optional
from unittest import mock

import numpy as np
import orbax.checkpoint as ocp

from mrcnn_jax.run import checkpoint as ckpt_lib
from mrcnn_jax.run import sharding as sharding_lib

# The log line's prefix when a hold begins (tests wait for it before they kill).
STALL_LOG = "fault_worker --stall"


def parse_stall(value: str) -> tuple[int, float]:
  """``"STEP:SECONDS"`` -> ``(STEP, SECONDS)``."""
  try:
    step, seconds = value.split(":")
    return int(step), float(seconds)
  except ValueError:
    raise ValueError(f"--stall={value!r}: expected STEP:SECONDS") from None


def hold_commit(value: str) -> Callable[[], None]:
  """Patches ``Checkpointer`` so that checkpoint STEP's commit waits SECONDS; returns the undo.

  Only async checkpointers hold (a synchronous save has no commit to hold open apart).
  """
  hold_step, seconds = parse_stall(value)
  cls = ckpt_lib.Checkpointer
  original_init, original_save = cls.__init__, cls.save

  def hold(checkpointer) -> None:
    step, checkpointer._held_step = checkpointer._held_step, None
    if step is not None:
      logging.warning("%s: checkpoint %d is written, holding its commit for %g s", STALL_LOG,
                      step, seconds)
      time.sleep(seconds)

  def __init__(self, directory, *, async_save: bool = True, **kwargs):
    self._held_step: Optional[int] = None
    self._holds = async_save
    make_manager = ocp.CheckpointManager

    def manager(directory, options=None, **kw):
      # Orbax runs this callback in its save thread after the files are written, before the
      # rename.
      options = dataclasses.replace(
          options, async_options=ocp.AsyncOptions(post_finalization_callback=lambda: hold(self)))
      return make_manager(directory, options=options, **kw)

    if not async_save:
      original_init(self, directory, async_save=async_save, **kwargs)
      return
    with mock.patch.object(ocp, "CheckpointManager", manager):
      original_init(self, directory, async_save=async_save, **kwargs)

  def save(self, step, state, meta, *, force=False):
    if (self._holds and step == hold_step and (force or self.should_save(step))
        and step not in self.all_steps()):
      self.wait()  # the previous save's callback must not see the mark
      self._held_step = int(step)
    return original_save(self, step, state, meta, force=force)

  cls.__init__, cls.save = __init__, save

  def undo() -> None:
    cls.__init__, cls.save = original_init, original_save

  return undo


def poison_batch(nan_step: int) -> None:
  """The ``nan_step``-th global batch built in this process gets NaN boxes."""
  make_global_batch = sharding_lib.make_global_batch  # the loop looks it up per step
  calls = itertools.count()

  def poisoned(host_batch, mesh, *a, **kw):
    if next(calls) == nan_step:
      host_batch = dict(host_batch)
      host_batch["gt_boxes"] = np.full_like(host_batch["gt_boxes"], np.nan)
    return make_global_batch(host_batch, mesh, *a, **kw)

  sharding_lib.make_global_batch = poisoned


def main() -> None:
  argv = sys.argv[1:]
  options = {}
  while argv and argv[0].startswith("--"):
    key, _, value = argv.pop(0)[2:].partition("=")
    options[key] = value
  if set(options) - {"nan-step", "stall"} or not argv:
    raise SystemExit(__doc__)
  if "stall" in options:
    hold_commit(options["stall"])
  if "nan-step" in options:
    poison_batch(int(options["nan-step"]))
  script = os.path.abspath(argv[0])
  sys.argv = [script, *argv[1:]]
  sys.path.insert(0, os.path.dirname(script))  # scripts import their sibling `_cli`
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
