"""The training loop end to end on a tiny model: checkpoints, exact resume, resume order, NaN stop.

Every run here uses the same tiny config, so the train step compiles once per process: later
runs hit JAX's persistent compilation cache (set per module to a temporary folder).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import data as data_lib
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.run import checkpoint as ckpt_lib
from mrcnn_jax.training import loop
from mrcnn_jax.training.train_state import TrainState


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes")
  data_lib.generate_shapes(str(out), num_train=12, num_val=4, size=64, seed=1)
  return str(out)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def tiny_config(data_dir: str, num_steps: int):
  c = config_lib.get_base_config()
  c.num_devices = 2  # data-parallel over 2 of the 8 fake CPU devices
  c.data.update(data_lib.shapes_data_paths(data_dir))
  c.data.image_size = (64, 64)
  c.data.max_instances = 8
  c.data.mask_size = 16
  c.data.eval_batch_size = 2
  c.model = tiny_model_config(num_classes=4)
  c.train.batch_size = 2
  c.train.num_steps = num_steps
  c.train.warmup_steps = 2
  c.train.decay_steps = (3,)  # the schedule changes inside the resumed part
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = True
  c.eval.at_end = False
  c.log.every_steps = 1
  return c


def _final_params(workdir: str):
  variables, step = ckpt_lib.load_variables(workdir)
  return variables["params"], step


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(shapes_dir, tmp_path):
  straight = loop.train_and_evaluate(tiny_config(shapes_dir, 4), str(tmp_path / "straight"))
  assert straight["step"] == 4 and straight["source"] == "scratch"
  assert np.isfinite(straight["train"]["total_loss"])

  # The same run stopped after 2 steps, then restarted with the same workdir for 4.
  resumed_dir = str(tmp_path / "resumed")
  first = loop.train_and_evaluate(tiny_config(shapes_dir, 2), resumed_dir)
  assert first["step"] == 2
  second = loop.train_and_evaluate(tiny_config(shapes_dir, 4), resumed_dir)
  assert second["source"] == "workdir checkpoint at step 2"
  assert second["step"] == 4

  a, step_a = _final_params(str(tmp_path / "straight"))
  b, step_b = _final_params(resumed_dir)
  assert step_a == step_b == 4
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # ...and training moved the parameters at all (so the comparison can fail).
  init, _ = ckpt_lib.load_variables(os.path.join(resumed_dir, "checkpoints", "2"))
  assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(init["params"]), flat_b))

  # The run's artefacts: config, TensorBoard events written by process 0.
  with open(os.path.join(resumed_dir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 4
  assert any(n.startswith("events.") for n in os.listdir(os.path.join(resumed_dir, "tensorboard")))


def _toy_state(value: float, step: int = 0) -> TrainState:
  params = {"head": {"kernel": jnp.full((2, 3), value)}, "cls": {"bias": jnp.full((4,), value)}}
  return TrainState(step=jnp.int32(step), params=params, opt_state={"m": jnp.zeros((2, 3))},
                    batch_stats={}, rng=jnp.zeros((2,), jnp.uint32))


def _config(**kw):
  c = config_lib.get_base_config()
  c.update(kw)
  return c


def test_resume_order_workdir_then_resume_then_init_weights(tmp_path):
  # A finished "other run" to resume from / take weights from.
  other = ckpt_lib.Checkpointer(str(tmp_path / "other" / "checkpoints"), async_save=False)
  other.save(7, _toy_state(3.0, step=7), ckpt_lib.checkpoint_meta(_config(), 7, 7), force=True)
  other.close()

  # Nothing in the workdir, nothing configured: scratch.
  mine = ckpt_lib.Checkpointer(str(tmp_path / "mine"), async_save=False)
  state, meta, source = ckpt_lib.restore_or_initialize(_config(), mine, _toy_state(0.0))
  assert source == "scratch" and meta["step"] == 0
  np.testing.assert_array_equal(state.params["head"]["kernel"], 0.0)

  # init_weights: parameters only (step stays 0); a leaf whose shape differs keeps its init.
  np.savez(tmp_path / "w.npz", **{"head/kernel": np.full((2, 3), 5.0, np.float32),
                                  "cls/bias": np.full((9,), 5.0, np.float32)})
  state, meta, source = ckpt_lib.restore_or_initialize(
      _config(init_weights=str(tmp_path / "w.npz")), mine, _toy_state(0.0))
  assert "1 leaves loaded, 1 fresh" in source and int(state.step) == 0
  np.testing.assert_array_equal(state.params["head"]["kernel"], 5.0)
  np.testing.assert_array_equal(state.params["cls"]["bias"], 0.0)

  # resume beats init_weights: the whole state, step included.
  cfg = _config(resume=str(tmp_path / "other"), init_weights=str(tmp_path / "w.npz"))
  state, meta, source = ckpt_lib.restore_or_initialize(cfg, mine, _toy_state(0.0))
  assert source.startswith("config.resume") and int(state.step) == 7 and meta["step"] == 7
  np.testing.assert_array_equal(state.params["head"]["kernel"], 3.0)

  # The workdir's own checkpoint beats both.
  mine.save(11, _toy_state(1.0, step=11), ckpt_lib.checkpoint_meta(_config(), 11, 11),
            force=True)
  state, meta, source = ckpt_lib.restore_or_initialize(cfg, mine, _toy_state(0.0))
  assert source == "workdir checkpoint at step 11" and int(state.step) == 11
  np.testing.assert_array_equal(state.params["cls"]["bias"], 1.0)
  mine.close()


def test_restart_with_another_model_refuses(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, _toy_state(1.0, 3), ckpt_lib.checkpoint_meta(_config(), 3, 3), force=True)
  changed = _config()
  changed.model.fpn.channels = 16
  with pytest.raises(ValueError, match=r"different model config \(model.fpn.channels\)"):
    ckpt_lib.restore_or_initialize(changed, ckpt, _toy_state(0.0))
  ckpt.close()


def test_checkpoint_from_before_a_new_model_field_still_restores(tmp_path):
  """A field added to the model config later is absent from an old checkpoint's meta."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  meta = ckpt_lib.checkpoint_meta(_config(), 3, 3)
  del meta["model_config"]["fpn"]["norm"]  # as written before `fpn.norm` existed
  ckpt.save(3, _toy_state(1.0, 3), meta, force=True)
  state, _, _ = ckpt_lib.restore_or_initialize(_config(), ckpt, _toy_state(0.0))
  assert int(state.step) == 3
  changed = _config()
  changed.model.fpn.norm = "gn"  # not the default: the old checkpoint did not have it
  with pytest.raises(ValueError, match=r"model.fpn.norm"):
    ckpt_lib.restore_or_initialize(changed, ckpt, _toy_state(0.0))
  ckpt.close()


def test_keep_n_and_interval(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, max_to_keep=2, async_save=True)
  saved = [s for s in range(1, 8) if ckpt.save(s, _toy_state(float(s), s), {"data_position": s})]
  ckpt.wait()
  assert saved == [2, 4, 6]
  assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
  ckpt.close()


def test_missing_resume_path_is_a_clear_error(tmp_path):
  mine = ckpt_lib.Checkpointer(str(tmp_path / "mine"), async_save=False)
  with pytest.raises(FileNotFoundError, match="checkpoint not found"):
    ckpt_lib.restore_or_initialize(_config(resume=str(tmp_path / "nope")), mine, _toy_state(0.0))
  mine.close()


def test_non_finite_loss_stops_with_step_and_losses():
  buffer = loop._MetricBuffer()  # pylint: disable=protected-access
  buffer.add(10, {"total_loss": jnp.float32(1.0), "roi_mask": jnp.float32(0.5)})
  buffer.add(11, {"total_loss": jnp.float32(np.nan), "roi_mask": jnp.float32(np.inf)})
  with pytest.raises(FloatingPointError, match=r"step 11: .*roi_mask.*inf"):
    buffer.flush()
  buffer.add(12, {"total_loss": jnp.float32(2.0), "roi_mask": jnp.float32(1.0)})
  buffer.add(13, {"total_loss": jnp.float32(4.0), "roi_mask": jnp.float32(3.0)})
  assert buffer.flush() == {"total_loss": 3.0, "roi_mask": 2.0}


def test_non_finite_gradient_with_finite_losses_stops():
  """A step whose losses are finite but whose gradient is not applies a NaN update: it must stop
  the run before the next checkpoint saves those parameters."""
  buffer = loop._MetricBuffer()  # pylint: disable=protected-access
  buffer.add(7, {"total_loss": jnp.float32(1.0), "grad_norm": jnp.float32(np.inf)})
  with pytest.raises(FloatingPointError, match=r"step 7: .*grad_norm.*inf"):
    buffer.flush()


def test_stop_signal_on_one_process_is_the_sigterm_flag():
  """One process: SIGTERM is read after the step it arrives in; the old handler comes back."""
  import signal  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGTERM)
  with loop._StopSignal() as stop:  # pylint: disable=protected-access
    assert not stop.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) == before
