"""The training loop with aspect-ratio buckets: one train-step program per bucket, compiled
before the first step, and every batch run on its own bucket's program.

The compile/dispatch pieces run on a toy step (fast); the whole loop on the tiny model compiles
two train steps and is marked slow.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import data as data_lib
from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import loop
from tests.training.test_loop import tiny_config

BUCKETS = ((64, 96), (96, 64))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes")
  data_lib.generate_shapes(str(out), num_train=12, num_val=4, size=64, seed=1)
  return str(out)


def _spy_compiles(monkeypatch) -> list:
  """Records every ``Lowered.compile`` call: the batch's (h, w) for a ``(state, batch)``
  function, else None."""
  compiled = []
  lower_compile = jax.stages.Lowered.compile

  def compile_spy(self, *args, **kwargs):
    positional = self.args_info[0]
    batch = positional[1] if len(positional) == 2 else None
    compiled.append(tuple(batch["image"].shape[1:3]) if isinstance(batch, dict) else None)
    return lower_compile(self, *args, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile_spy)
  return compiled


def test_compile_train_steps_and_dispatch_by_image_size(monkeypatch, caplog):
  config = config_lib.get_base_config()
  config.data.buckets = BUCKETS
  config.data.min_size, config.data.max_size = 48, 64
  config.data.max_instances, config.data.mask_size = 8, 16
  config.train.batch_size = 4
  mesh = sharding_lib.make_mesh(jax.devices()[:2])
  replicated = sharding_lib.replicated(mesh)
  # A step with the real one's calling convention: (state, batch) -> (state, metrics).
  step_fn = jax.jit(lambda state, batch: (state + 1, {"h": batch["image"].shape[1] + 0 * state,
                                                      "boxes": batch["gt_boxes"].sum()}),
                    in_shardings=(replicated, sharding_lib.batch_sharding(mesh)),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  compiled = _spy_compiles(monkeypatch)
  caplog.set_level(logging.INFO)
  state = jax.device_put(np.int32(0), replicated)
  compile_steps = loop._compile_train_steps  # pylint: disable=protected-access
  programs = compile_steps(step_fn, state, config, mesh)
  assert compiled == list(BUCKETS) and sorted(programs) == sorted(BUCKETS)
  logged = [r.getMessage() for r in caplog.records if "train step compiled" in r.getMessage()]
  assert [m.split()[4] for m in logged] == ["64x96", "96x64"], logged
  specs = data_lib.train_batch_specs(config, 4)
  for size in (BUCKETS[1], BUCKETS[0], BUCKETS[1]):
    batch = sharding_lib.make_global_batch(
        {k: np.ones(shape, dtype) for k, (shape, dtype) in specs[size].items()}, mesh)
    program = loop._program_for(programs, batch)  # pylint: disable=protected-access
    assert program is programs[size]
    state, metrics = program(state, batch)
    assert int(metrics["h"]) == size[0] and float(metrics["boxes"]) == 4 * 8 * 4
  assert int(state) == 3 and len(compiled) == 2  # the calls compiled nothing more
  batch = sharding_lib.make_global_batch({"image": np.zeros((4, 64, 64, 3), np.uint8)}, mesh)
  with pytest.raises(ValueError, match=r"64x64 images, but the train step was compiled for"):
    loop._program_for(programs, batch)  # pylint: disable=protected-access


@pytest.mark.slow
def test_each_bucket_compiles_once_before_the_first_step(shapes_dir, tmp_path, monkeypatch,
                                                         caplog):
  config = tiny_config(shapes_dir, num_steps=4)
  config.data.buckets = BUCKETS
  config.data.min_size, config.data.max_size = 48, 64
  config.checkpoint.every_steps = 100  # only the final save
  config.num_devices = 1  # cheaper compiles; the sharded step is test_loop.py's business
  config.model.mask.chunk_size = 0  # one mask-head chunk: same numbers, a smaller program
  compiled = _spy_compiles(monkeypatch)
  steps = []  # (image size, program, compiles so far) per step
  program_for = loop._program_for  # pylint: disable=protected-access

  def program_spy(programs, batch):
    program = program_for(programs, batch)
    steps.append((tuple(batch["image"].shape[1:3]), program, len(compiled)))
    return program

  monkeypatch.setattr(loop, "_program_for", program_spy)
  caplog.set_level(logging.INFO)
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))

  assert result["step"] == 4 and np.isfinite(result["train"]["total_loss"])
  assert compiled == list(BUCKETS)  # once each, and nothing else
  assert len(steps) == 4 and {s[0] for s in steps} == set(BUCKETS)  # both buckets trained on
  assert all(n == 2 for _, _, n in steps)  # both compiled before the first step, none after
  programs = {}
  for size, program, _ in steps:
    assert isinstance(program, jax.stages.Compiled)  # a call cannot compile again
    assert programs.setdefault(size, program) is program  # one program per bucket
  logged = [r.getMessage() for r in caplog.records if "train step compiled" in r.getMessage()]
  assert [m.split()[4] for m in logged] == ["64x96", "96x64"], logged
