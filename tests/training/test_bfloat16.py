"""The bfloat16 train step: no float32 island in its convolutions and matmuls, and losses close
to float32's on the same batch and weights.

The dtype audit reads the StableHLO the model lowers to (what it asks XLA for, on any
backend); XLA:CPU then computes bfloat16 in float32 (no bfloat16 units), so the compiled CPU
program is not the one to audit. The backbone rematerialisation options give the same numbers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import modeling
from mrcnn_jax.benchmarks import hlo_audit
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import train_state as train_state_lib
from mrcnn_jax.training import train_step as train_step_lib
from tests.training import synthetic

IMAGE_SIZE = (96, 128)  # not square, not a multiple of 64 on both sides


def _config(compute_dtype, remat="none"):
  config = config_lib.get_base_config()
  config.model = tiny_model_config(num_classes=4)
  config.model.compute_dtype = compute_dtype
  config.model.backbone.remat = remat
  config.model.backbone.trainable_layers = 5  # every stage trains: remat applies everywhere
  config.data.image_size = IMAGE_SIZE
  config.data.max_instances = 4
  config.data.mask_size = 28
  config.train.batch_size = 2
  config.train.warmup_steps = 0
  return config


def _step(config):
  """(jitted step, initial state, global batch) on one device, weights from key 0."""
  model = modeling.MaskRCNN(config.model)
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  state = train_state_lib.create_train_state(config, model, jax.random.PRNGKey(0), mesh)
  step_fn = train_step_lib.make_train_step(config, model, mesh, state)
  batch = synthetic.make_batch(np.random.default_rng(0), 2, IMAGE_SIZE, max_instances=4,
                               mask_size=28, min_size=16)
  return step_fn, state, sharding_lib.make_global_batch(batch, mesh)


@pytest.fixture(scope="module")
def lowered_text():
  """StableHLO of the step per (compute dtype, remat), lowered once each."""
  texts = {}

  def get(compute_dtype, remat="none"):
    if (compute_dtype, remat) not in texts:
      step_fn, state, batch = _step(_config(compute_dtype, remat))
      texts[compute_dtype, remat] = step_fn.lower(state, batch).as_text()
    return texts[compute_dtype, remat]
  return get


def test_bfloat16_step_has_no_float32_convolution_or_matmul_but_the_targets(lowered_text):
  text = lowered_text("bfloat16")
  counts = hlo_audit.op_dtypes(text)
  assert counts[("convolution", "bf16")] > 100  # forward and both backward convolutions
  assert counts[("convolution", "f32")] == 0
  assert counts[("dot", "bf16")] > 0  # the box head's fully connected layers
  # The only float32 matmuls are the mask targets' resampling of the GT masks (box math, at
  # HIGHEST precision by design), not in the network.
  f32_dots = [line for line in text.splitlines()
              if "dot_general" in line and hlo_audit.op_dtypes(line)[("dot", "f32")]]
  assert f32_dots and all("HIGHEST" in line for line in f32_dots), f32_dots
  # RoIAlign gathers the feature maps in bfloat16.
  fpn = tiny_model_config().fpn.channels
  assert f"x{fpn}xbf16>" in text and "stablehlo.gather" in text


def test_float32_step_audit_counts_float32(lowered_text):
  counts = hlo_audit.op_dtypes(lowered_text("float32"))
  assert counts[("convolution", "f32")] > 100 and counts[("convolution", "bf16")] == 0


def test_remat_recomputes_the_backbone(lowered_text):
  """The rematerialised step lowers with the recomputation fenced off (optimization barriers
  keep XLA from merging it back into the forward pass)."""
  none = lowered_text("float32").count("optimization_barrier")
  blocks = lowered_text("float32", "blocks").count("optimization_barrier")
  assert blocks >= none + 4  # one per trainable bottleneck block (4 in the tiny model)


def _first_step(config):
  step_fn, state, batch = _step(config)
  new_state, metrics = step_fn(state, batch)
  return jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, new_state.params)


@pytest.fixture(scope="module")
def float32_step():
  return _first_step(_config("float32"))


def test_bfloat16_losses_within_tolerance_of_float32(float32_step):
  want, _ = float32_step
  got, params = _first_step(_config("bfloat16"))
  # bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9 per op); over the network and
  # the loss reductions the losses move by up to a few percent. The RPN losses see the same
  # anchors and samples; the RoI losses also see proposals ranked by bfloat16 scores.
  for k in train_step_lib.LOSS_KEYS:
    np.testing.assert_allclose(got[k], want[k], rtol=0.05, atol=2e-3, err_msg=k)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == np.float32


@pytest.mark.parametrize("remat", ["blocks", "stages"])
def test_backbone_remat_gives_the_same_step(float32_step, remat):
  want_metrics, want_params = float32_step
  got_metrics, got_params = _first_step(_config("float32", remat))
  for k in train_step_lib.LOSS_KEYS:
    np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match="backbone.remat must be one of"):
    _first_step(_config("float32", "everything"))
