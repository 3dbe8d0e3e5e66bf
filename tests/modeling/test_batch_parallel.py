"""batch_parallel: per-image parts run shard-locally with the same numbers and no all-gather."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.kernels.roi_pool import pool_rois_loop
from mrcnn_jax.modeling import batch_parallel
from mrcnn_jax.ops import multilevel_roi_align
from mrcnn_jax.benchmarks import collectives
from mrcnn_jax.run import sharding

STRIDES = (4, 8, 16, 32)


def _inputs(batch, size=64, channels=16, rois=12, seed=0):
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(batch, size // s, size // s, channels)).astype(np.float32)
           for s in STRIDES]
  xy = rng.uniform(0, size * 0.7, (batch, rois, 2))
  wh = rng.uniform(2, size * 0.6, (batch, rois, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, size)], -1).astype(np.float32)
  return feats, boxes


# RoIAlign's plain pooling and the CPU kernel's loop (a custom backward inside shard_map).
POOLS = pytest.mark.parametrize("pool_rois", [None, pool_rois_loop], ids=["plain", "cpu_loop"])


def _pooled_loss(feats, boxes, mesh, pool_rois=None):
  """Sum of squares of RoIAlign outputs, RoIAlign run through per_example over ``mesh``."""
  out = batch_parallel.per_example(
      lambda f, b: multilevel_roi_align(f, b, 7, strides=STRIDES, sampling_ratio=2,
                                        pool_rois=pool_rois), feats, boxes, mesh=mesh)
  return jnp.sum(out**2), out


def _jitted(mesh, pool_rois):
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(jax.value_and_grad(lambda f, b: _pooled_loss(f, b, mesh, pool_rois),
                                    has_aux=True), in_shardings=(batch_sh, batch_sh))


@POOLS
def test_same_values_and_gradients_as_unsharded(pool_rois):
  feats, boxes = _inputs(8)
  mesh = sharding.make_mesh(jax.devices()[:8])
  (loss_s, out_s), grads_s = _jitted(mesh, pool_rois)(feats, boxes)
  (loss_p, out_p), grads_p = jax.jit(jax.value_and_grad(
      lambda f, b: _pooled_loss(f, b, None, pool_rois), has_aux=True))(feats, boxes)
  np.testing.assert_allclose(out_s, out_p, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss_s, loss_p, rtol=1e-6)
  for gs, gp in zip(grads_s, grads_p):
    np.testing.assert_allclose(gs, gp, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(grads_s[0]).sum()) > 0  # the gradient reached the features


@POOLS
def test_sharded_roi_align_moves_no_feature_maps(pool_rois):
  """Without the mesh the partitioner all-gathers the maps; with it, nothing is gathered."""
  feats, boxes = _inputs(8)
  mesh = sharding.make_mesh(jax.devices()[:8])
  batch_sh = sharding.batch_sharding(mesh)

  def hlo(use_mesh):
    fn = jax.jit(jax.grad(lambda f, b: _pooled_loss(f, b, mesh if use_mesh else None,
                                                    pool_rois)[0]),
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
  f = lambda row, s: jnp.cumsum(row) * s

  def run(m):
    return batch_parallel.vmap(f, in_axes=(0, None), mesh=m)(x, shared)

  expected = np.cumsum(x, axis=1) * 2
  np.testing.assert_allclose(jax.jit(lambda: run(mesh))(), expected)
  np.testing.assert_allclose(jax.jit(lambda: run(None))(), expected)
  np.testing.assert_allclose(run(None), expected)  # eagerly, no mesh


def test_bad_batch_and_axis_are_errors():
  mesh = sharding.make_mesh(jax.devices()[:4])
  with pytest.raises(ValueError, match="does not split over 4"):
    jax.jit(batch_parallel.vmap(lambda row: row * 2, mesh=mesh))(np.zeros((6, 2), np.float32))
  with pytest.raises(ValueError, match="no 'model' axis"):
    batch_parallel.per_example(lambda a: a, np.zeros((4, 2)), mesh=mesh, axis="model")
  with pytest.raises(ValueError, match="in_axes"):
    batch_parallel.per_example(lambda a: a, np.zeros(2), in_axes=1)
