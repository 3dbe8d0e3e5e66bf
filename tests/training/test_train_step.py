"""Train-step machinery on a fast stand-in module: shardings, donation, rng folding, trainable BN.

The same properties on the real (tiny) MaskRCNN, plus frozen parameters, gradients and
bfloat16, are in ``test_train_step_maskrcnn.py``; this file keeps what needs no detector.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import optimizer as optimizer_lib
from mrcnn_jax.training import train_state as train_state_lib
from mrcnn_jax.training import train_step as train_step_lib
from mrcnn_jax.training import config as train_config_lib
from tests.training import synthetic

IMAGE_SIZE = (32, 32)
MAX_INSTANCES = 4
MASK_SIZE = 8


# ----------------------------------------------------------------------------------------------
# A stand-in detector: the MaskRCNN.losses interface on a few convs, fast to compile.
# ----------------------------------------------------------------------------------------------


class StandIn(nn.Module):
  """Same ``losses(batch) -> (losses, stats)`` contract as ``MaskRCNN``; 'stem' is frozen."""
  config: ml_collections.ConfigDict

  def setup(self):
    dtype = jnp.dtype(self.config.compute_dtype)
    self.stem = nn.Conv(4, (3, 3), dtype=dtype)
    self.body = nn.Conv(8, (3, 3), strides=2, dtype=dtype)
    self.head = nn.Dense(4 + 4, dtype=dtype)
    # Trainable BatchNorm ('bn'): batch statistics in a mutable 'batch_stats' collection.
    self.norm = (nn.BatchNorm(use_running_average=False, momentum=0.5)
                 if self.config.norm == "bn" else None)

  def losses(self, batch):
    x = batch["image"].astype(jnp.dtype(self.config.compute_dtype)) / 255.0
    # Frozen like frozen-BN / stage 1: no gradient reaches the stem's parameters.
    x = jax.lax.stop_gradient(nn.relu(self.stem(x)))
    x = self.body(x)
    if self.norm is not None:
      x = self.norm(x)
    x = nn.relu(x).mean(axis=(1, 2))
    out = self.head(x).astype(jnp.float32)  # [B, 8]
    box_target = batch["gt_boxes"][:, 0] / IMAGE_SIZE[0]
    # A sampled subset (the 'sampling' stream) of the 4 outputs enters one loss, as anchors do.
    keep = jax.random.bernoulli(self.make_rng("sampling"), 0.5, out[:, 4:].shape)
    cls = batch["gt_classes"][:, 0].astype(jnp.float32)[:, None]
    valid = batch["gt_valid"].astype(jnp.float32)
    losses = {
        "rpn_objectness": jnp.mean(jnp.where(keep, (out[:, 4:] - cls)**2, 0.0)),
        "rpn_box": jnp.mean(jnp.abs(out[:, :4] - box_target)),
        "roi_class": jnp.mean((out[:, 4] - valid.sum(-1))**2),
        "roi_box": jnp.mean(out[:, :4]**2) * 0.1,
        "roi_mask": jnp.mean((out[:, 5:] - batch["gt_masks"].mean((1, 2, 3))[:, None])**2),
    }
    stats = {"rpn_num_fg": keep.sum(-1).mean().astype(jnp.float32),
             "roi_num_fg": valid.sum(-1).mean()}
    return losses, stats


def stand_in_init(model, key, image_size):
  batch = synthetic.make_batch(np.random.default_rng(0), 1, image_size,
                               max_instances=MAX_INSTANCES, mask_size=MASK_SIZE)
  return model.init({"params": key, "sampling": key}, batch, method=StandIn.losses)


def stand_in_trainable(params):
  return {k: jax.tree.map(lambda _: k != "stem", v) for k, v in params.items()}


def _config(compute_dtype="float32", batch_size=8, norm="frozen_bn"):
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"compute_dtype": compute_dtype, "norm": norm})
  config.data = ml_collections.ConfigDict(
      {"image_size": IMAGE_SIZE, "max_instances": MAX_INSTANCES, "mask_size": MASK_SIZE})
  config.train = train_config_lib.train_config()
  config.train.batch_size = batch_size
  config.train.warmup_steps = 2
  return config


@functools.lru_cache(maxsize=None)
def _compiled_setup(compute_dtype, batch_size, norm, num_devices):
  """Model, mesh, optimizer and jitted step, shared by tests so each compiles only once."""
  config = _config(compute_dtype, batch_size, norm)
  model = StandIn(config.model)
  mesh = sharding_lib.make_mesh(jax.devices()[:num_devices])
  tx = optimizer_lib.make_optimizer(config.train, trainable_mask=stand_in_trainable)
  abstract = jax.eval_shape(
      lambda: train_state_lib.create_train_state(config, model, jax.random.PRNGKey(0), mesh,
                                                 optimizer=tx, init_fn=stand_in_init))
  step_fn = train_step_lib.make_train_step(config, model, mesh, abstract, optimizer=tx)
  return model, mesh, tx, step_fn


def _setup(config, devices):
  """(mesh, fresh state at step 0, jitted step) for ``config`` on ``devices``."""
  model, mesh, tx, step_fn = _compiled_setup(config.model.compute_dtype, config.train.batch_size,
                                             config.model.norm, len(devices))
  state = train_state_lib.create_train_state(config, model, jax.random.PRNGKey(0), mesh,
                                             optimizer=tx, init_fn=stand_in_init)
  return mesh, state, step_fn


def _batch(config, seed=0):
  return synthetic.make_batch(np.random.default_rng(seed), config.train.batch_size,
                              IMAGE_SIZE, max_instances=MAX_INSTANCES, mask_size=MASK_SIZE)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_state_is_created_replicated_over_the_mesh():
  config = _config()
  mesh, state, _ = _setup(config, jax.devices())
  assert len(jax.devices()) == 8
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated
    assert leaf.sharding.mesh.shape == {"data": 8}
  assert int(state.step) == 0
  assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)


def test_one_compile_for_many_steps_and_metrics():
  config = _config()
  mesh, state, step_fn = _setup(config, jax.devices())
  for i in range(4):
    batch = sharding_lib.make_global_batch(_batch(config, seed=i), mesh)
    state, metrics = step_fn(state, batch)
  # One compilation for every step (and for the other tests sharing this jitted step).
  assert step_fn._cache_size() == 1
  assert int(state.step) == 4
  expected = set(train_step_lib.LOSS_KEYS) | {"total_loss", "learning_rate", "grad_norm",
                                              "rpn_num_fg", "roi_num_fg"}
  assert set(metrics) == expected
  for name, value in metrics.items():
    assert isinstance(value, jax.Array) and value.shape == () and value.dtype == jnp.float32, name
    assert value.sharding.is_fully_replicated
  # The rate used by the 4th update (step 3), past the 2-step warm-up: peak 0.02 * 8 / 16.
  np.testing.assert_allclose(float(metrics["learning_rate"]), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["total_loss"]),
                             sum(float(metrics[k]) for k in train_step_lib.LOSS_KEYS), rtol=1e-5)


def test_state_is_donated():
  config = _config()
  mesh, state, step_fn = _setup(config, jax.devices())
  old_kernel = state.params["body"]["kernel"]
  state, _ = step_fn(state, sharding_lib.make_global_batch(_batch(config), mesh))
  assert old_kernel.is_deleted()


def test_same_loss_and_update_on_1_and_8_devices_with_trainable_bn():
  """Same math on any mesh; trainable-BN statistics are over the *global* batch."""
  config = _config(batch_size=8, norm="bn")
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh, state, step_fn = _setup(config, devices)
    for i in range(3):
      state, metrics = step_fn(state, sharding_lib.make_global_batch(_batch(config, seed=i), mesh))
    results.append((_host(state.params), _host(state.batch_stats), _host(metrics)))
  (params_1, stats_1, metrics_1), (params_8, stats_8, metrics_8) = results
  for k in metrics_1:
    np.testing.assert_allclose(metrics_1[k], metrics_8[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               (params_1, stats_1), (params_8, stats_8))
  assert stats_1 and stats_8


def test_trainable_bn_updates_batch_stats():
  config = _config(norm="bn")
  mesh, state, step_fn = _setup(config, jax.devices())
  before = _host(state.batch_stats)
  state, _ = step_fn(state, sharding_lib.make_global_batch(_batch(config), mesh))
  after = _host(state.batch_stats)
  # Running mean moves from its init (0) toward the batch mean, over the whole global batch.
  assert np.abs(after["norm"]["mean"] - before["norm"]["mean"]).max() > 0


def test_step_folds_step_into_rng():
  """Resuming at step t draws the same samples as running through: rng depends on (key, t)."""
  config = _config()
  mesh, state, step_fn = _setup(config, jax.devices())
  batch = _batch(config)
  key = _host(state.rng)
  snapshot = jax.tree.map(jnp.copy, state)  # the step donates its input
  state, m_a = step_fn(state, sharding_lib.make_global_batch(batch, mesh))
  state, m_b = step_fn(state, sharding_lib.make_global_batch(batch, mesh))
  # The base key is never advanced; the step number alone changes the draw.
  np.testing.assert_array_equal(_host(state.rng), key)
  assert float(m_a["rpn_num_fg"]) != float(m_b["rpn_num_fg"])
  _, m_resumed = step_fn(snapshot, sharding_lib.make_global_batch(batch, mesh))
  for k in m_a:
    assert float(m_a[k]) == float(m_resumed[k]), k
