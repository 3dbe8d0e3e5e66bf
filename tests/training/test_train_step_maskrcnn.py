"""The sharded train step on the real (tiny) MaskRCNN: compile once, 1 vs 8 devices, gradients.

Two runs are shared by the tests (each costs a compilation):
  * ``run8``: the default optimizer (frozen parts masked) on an 8-device mesh;
  * ``run1``: an optimizer that would update *every* parameter, on a 1-device mesh. Frozen
    parameters must still not move: the model itself gives them zero gradient.
Weight decay is off so that, on the first step, a parameter moves iff its gradient is non-zero.
The tiny model compiles in tens of seconds, so these runs are shared and kept to two steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import modeling
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import optimizer as optimizer_lib
from mrcnn_jax.training import train_state as train_state_lib
from mrcnn_jax.training import train_step as train_step_lib
from tests.training import synthetic

IMAGE_SIZE = (64, 64)
NUM_STEPS = 2


def _config(compute_dtype="float32"):
  config = config_lib.get_base_config()
  config.model = tiny_model_config(num_classes=4)
  config.model.compute_dtype = compute_dtype
  config.data.image_size = IMAGE_SIZE
  config.data.max_instances = 4
  config.data.mask_size = 28
  config.train.batch_size = 8
  config.train.warmup_steps = 0
  config.train.weight_decay = 0.0
  return config


def _batches(config):
  rng = np.random.default_rng(0)
  return [synthetic.make_batch(rng, config.train.batch_size, IMAGE_SIZE,
                               max_instances=config.data.max_instances,
                               mask_size=config.data.mask_size, min_size=12)
          for _ in range(NUM_STEPS)]


def _run(config, devices, optimizer):
  model = modeling.MaskRCNN(config.model)
  mesh = sharding_lib.make_mesh(devices)
  state = train_state_lib.create_train_state(config, model, jax.random.PRNGKey(0), mesh,
                                             optimizer=optimizer)
  step_fn = train_step_lib.make_train_step(config, model, mesh, state, optimizer=optimizer)
  params = [jax.tree.map(np.asarray, state.params)]
  metrics = []
  for batch in _batches(config):
    state, m = step_fn(state, sharding_lib.make_global_batch(batch, mesh))
    params.append(jax.tree.map(np.asarray, state.params))
    metrics.append(m)
  return {"params": params, "metrics": jax.tree.map(np.asarray, metrics), "state": state,
          "cache_size": step_fn._cache_size(), "raw_metrics": metrics}


@pytest.fixture(scope="module")
def run8():
  config = _config()
  return _run(config, jax.devices(), train_state_lib.default_optimizer(config))


@pytest.fixture(scope="module")
def run1():
  config = _config()
  everything = optimizer_lib.make_optimizer(config.train, trainable_mask=None)
  return _run(config, jax.devices()[:1], everything)


def _trainable(params):
  return modeling.trainable_mask(params, _config().model)


def test_one_compile_and_metrics(run8):
  assert len(jax.devices()) == 8
  assert run8["cache_size"] == 1
  assert int(run8["state"].step) == NUM_STEPS
  expected = set(train_step_lib.LOSS_KEYS) | {"total_loss", "learning_rate", "grad_norm",
                                              "rpn_num_fg", "roi_num_fg"}
  for m in run8["raw_metrics"]:
    assert expected <= set(m)
    for name, value in m.items():
      assert value.shape == () and value.dtype == jnp.float32, name
      assert value.sharding.is_fully_replicated, name
      assert np.isfinite(np.asarray(value)), name
  first = run8["metrics"][0]
  assert first["rpn_num_fg"] > 0 and first["roi_num_fg"] > 0 and first["grad_norm"] > 0
  np.testing.assert_allclose(first["learning_rate"], 0.01, rtol=1e-6)  # 0.02 * 8 / 16


def test_frozen_params_unchanged_every_trainable_param_moves(run8):
  before, after = run8["params"][0], run8["params"][1]
  trainable = _trainable(before)
  n_frozen = 0
  for (path, old), new, train in zip(jax.tree_util.tree_leaves_with_path(before),
                                     jax.tree.leaves(after), jax.tree.leaves(trainable)):
    if train:
      assert np.abs(new - old).max() > 0, f"no gradient reached {jax.tree_util.keystr(path)}"
    else:
      n_frozen += 1
      np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))
  assert n_frozen > 0  # the default config freezes the stem, layer1 and the frozen-BN affines


def test_frozen_params_get_zero_gradient_inside_the_model(run1):
  """With an optimizer that updates everything, frozen parameters move only if grad != 0."""
  before, after = run1["params"][0], run1["params"][-1]
  for (path, old), new, train in zip(jax.tree_util.tree_leaves_with_path(before),
                                     jax.tree.leaves(after), jax.tree.leaves(_trainable(before))):
    if not train:
      np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))


def test_same_loss_and_update_on_1_and_8_devices(run1, run8):
  """Step 0 sees identical parameters: the same losses, then the same first update.

  Later steps are not compared tightly: top-k and sampling decisions are discontinuous in the
  parameters, so last-bit reduction-order differences may legitimately flip a proposal.
  """
  m1, m8 = run1["metrics"][0], run8["metrics"][0]
  for k in m8:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for p1, p8 in zip(jax.tree.leaves(run1["params"][1]), jax.tree.leaves(run8["params"][1])):
    np.testing.assert_allclose(p1, p8, rtol=1e-4, atol=1e-6)


def test_bfloat16_step_is_finite():
  config = _config(compute_dtype="bfloat16")
  model = modeling.MaskRCNN(config.model)
  mesh = sharding_lib.make_mesh(jax.devices()[:2])
  config.train.batch_size = 2
  state = train_state_lib.create_train_state(config, model, jax.random.PRNGKey(1), mesh)
  step_fn = train_step_lib.make_train_step(config, model, mesh, state)
  batch = synthetic.make_batch(np.random.default_rng(3), 2, IMAGE_SIZE, max_instances=4,
                               mask_size=28, min_size=12)
  for _ in range(2):
    state, metrics = step_fn(state, sharding_lib.make_global_batch(batch, mesh))
  for name, value in metrics.items():
    assert np.isfinite(float(value)), name
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == jnp.float32
