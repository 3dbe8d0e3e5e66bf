"""batch_parallel: per-image parts run shard-locally with the same numbers and no all-gather."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import batch_parallel
from mrcnn_jax.ops import multilevel_roi_align
from mrcnn_jax.training import collectives
from mrcnn_jax.training import sharding

STRIDES = (4, 8, 16, 32)


def _inputs(batch, size=64, channels=16, rois=12, seed=0):
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(batch, size // s, size // s, channels)).astype(np.float32)
           for s in STRIDES]
  xy = rng.uniform(0, size * 0.7, (batch, rois, 2))
  wh = rng.uniform(2, size * 0.6, (batch, rois, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, size)], -1).astype(np.float32)
  return feats, boxes


def _pooled_loss(feats, boxes, mesh):
  """Sum of squares of RoIAlign outputs, RoIAlign run through per_example under ``mesh``."""
  with batch_parallel.data_parallel(mesh):
    out = batch_parallel.per_example(
        lambda f, b: multilevel_roi_align(f, b, 7, strides=STRIDES, sampling_ratio=2), feats,
        boxes)
  return jnp.sum(out**2), out


def _jitted(mesh):
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(jax.value_and_grad(lambda f, b: _pooled_loss(f, b, mesh), has_aux=True),
                 in_shardings=(batch_sh, batch_sh))


def test_same_values_and_gradients_as_unsharded():
  feats, boxes = _inputs(8)
  mesh = sharding.make_mesh(jax.devices()[:8])
  (loss_s, out_s), grads_s = _jitted(mesh)(feats, boxes)
  (loss_p, out_p), grads_p = jax.jit(jax.value_and_grad(
      lambda f, b: _pooled_loss(f, b, None), has_aux=True))(feats, boxes)
  np.testing.assert_allclose(out_s, out_p, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss_s, loss_p, rtol=1e-6)
  for gs, gp in zip(grads_s, grads_p):
    np.testing.assert_allclose(gs, gp, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(grads_s[0]).sum()) > 0  # the gradient reached the features


def test_sharded_roi_align_moves_no_feature_maps():
  """Without data_parallel the partitioner all-gathers the maps; with it, nothing is gathered."""
  feats, boxes = _inputs(8)
  mesh = sharding.make_mesh(jax.devices()[:8])
  batch_sh = sharding.batch_sharding(mesh)

  def hlo(use_mesh):
    fn = jax.jit(jax.grad(lambda f, b: _pooled_loss(f, b, mesh if use_mesh else None)[0]),
                 in_shardings=(batch_sh, batch_sh))
    return collectives.collective_stats(fn.lower(feats, boxes).compile().as_text())

  local, default = hlo(True), hlo(False)
  feature_bytes = sum(f.nbytes for f in feats)
  assert default["all-gather"]["bytes"] >= feature_bytes // 8  # the failure mode this prevents
  assert local["all-gather"]["bytes"] == 0
  assert local["collective-permute"]["bytes"] == 0
  # What remains is the scalar loss's all-reduce.
  assert local["all-reduce"]["bytes"] <= 64


def test_vmap_with_shared_argument_and_plain_fallback():
  mesh = sharding.make_mesh(jax.devices()[:4])
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  shared = np.float32(2.0)
  fn = batch_parallel.vmap(lambda row, s: jnp.cumsum(row) * s, in_axes=(0, None))

  def run(m):
    with batch_parallel.data_parallel(m):
      return fn(x, shared)

  expected = np.cumsum(x, axis=1) * 2
  np.testing.assert_allclose(jax.jit(lambda: run(mesh))(), expected)
  np.testing.assert_allclose(jax.jit(lambda: run(None))(), expected)
  np.testing.assert_allclose(fn(x, shared), expected)  # no context at all


def test_bad_batch_and_axis_are_errors():
  mesh = sharding.make_mesh(jax.devices()[:4])
  fn = batch_parallel.vmap(lambda row: row * 2)
  with pytest.raises(ValueError, match="does not split over 4"):
    with batch_parallel.data_parallel(mesh):
      jax.jit(fn)(np.zeros((6, 2), np.float32))
  with pytest.raises(ValueError, match="no 'model' axis"):
    with batch_parallel.data_parallel(mesh, axis="model"):
      pass
  with pytest.raises(ValueError, match="in_axes"):
    batch_parallel.per_example(lambda a: a, np.zeros(2), in_axes=1)
