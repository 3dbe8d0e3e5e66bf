"""Checkpointer faults without a model: kill -9 mid-write, leftovers, the commit-hold fault.

A small process saves a toy state every 2 steps with checkpoint 4's commit held open (the fault
worker's ``hold_commit``, patched in); it is killed while 4 is written but uncommitted. The
whole-run variants (scripts/train.py, a model, exact resume) are in test_faults.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.run import checkpoint as ckpt_lib
from tests.training import fault_worker

HERE = os.path.dirname(os.path.abspath(__file__))
SAVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    sys.path.insert(0, sys.argv[2])
    import fault_worker
    from mrcnn_jax.run import checkpoint as ckpt_lib
    fault_worker.hold_commit(sys.argv[3])
    ckpt = ckpt_lib.Checkpointer(sys.argv[1], every_steps=2, cleanup_tmp=True)
    for step in range(1, 9):
      ckpt.save(step, {"w": jnp.full((3, 4), float(step))}, {"data_position": step})
    ckpt.close()
    print("all saved", flush=True)
""")


def _state(value: float) -> dict:
  return {"w": jnp.full((3, 4), value)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_kill9_mid_write_leaves_no_usable_partial_and_owner_cleans_up(tmp_path):
  directory = str(tmp_path / "checkpoints")
  log_path = str(tmp_path / "saver.log")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-c", SAVER, directory, HERE, "4:120"], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
  try:
    deadline = time.monotonic() + 120
    while "checkpoint 4 is written, holding its commit" not in open(log_path).read():
      assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()[-2000:]
      time.sleep(0.05)
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  names = sorted(os.listdir(directory))
  assert names == ["2", "4.orbax-checkpoint-tmp"], names  # 4's files are there, uncommitted
  assert os.listdir(os.path.join(directory, "4.orbax-checkpoint-tmp", "state"))

  # A reader (e.g. config.resume pointing here) sees only the complete checkpoint and must not
  # delete the partial one: it could belong to a run that is still writing it.
  reader = ckpt_lib.Checkpointer(directory, async_save=False)
  assert reader.latest_step() == 2 and reader.all_steps() == [2]
  state, meta = reader.restore(2, _abstract(_state(0.0)))
  reader.close()
  np.testing.assert_array_equal(state["w"], 2.0)
  assert meta["data_position"] == 2 and meta["step"] == 2
  assert "4.orbax-checkpoint-tmp" in os.listdir(directory)

  # The owner (the workdir's own checkpointer) deletes the leftover when it starts, and saving
  # step 4 again works.
  owner = ckpt_lib.Checkpointer(directory, every_steps=2, cleanup_tmp=True)
  assert sorted(os.listdir(directory)) == ["2"]
  assert owner.latest_step() == 2
  assert owner.save(4, _state(4.5), {"data_position": 4})
  owner.wait()
  assert owner.all_steps() == [2, 4]
  state, _ = owner.restore(4, _abstract(_state(0.0)))
  owner.close()
  np.testing.assert_array_equal(state["w"], 4.5)


def test_stall_hook_holds_only_its_step(tmp_path, caplog):
  undo = fault_worker.hold_commit("4:0.5")
  try:
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2)
    with caplog.at_level(logging.WARNING):
      for step in (2, 4, 6):
        t0 = time.monotonic()
        ckpt.save(step, _state(float(step)), {"data_position": step})
        ckpt.wait()
        if step == 4:
          held = time.monotonic() - t0
    ckpt.close()
  finally:
    undo()
  holds = [r.getMessage() for r in caplog.records if "holding its commit" in r.getMessage()]
  assert holds == [f"{fault_worker.STALL_LOG}: checkpoint 4 is written, holding its commit "
                   "for 0.5 s"], holds
  assert held >= 0.5 and ckpt.all_steps() == [2, 4, 6]


@pytest.mark.parametrize("value", ["4", "a:1", "4:x", "4:1:2"])
def test_stall_hook_rejects_malformed_values(value):
  with pytest.raises(ValueError, match="expected STEP:SECONDS"):
    fault_worker.hold_commit(value)
