"""RoIAlign against torchvision.ops.roi_align / MultiScaleRoIAlign (values and gradients)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from mrcnn_jax.kernels.roi_pool import pool_rois_loop
from mrcnn_jax.ops.roi_align import assign_fpn_levels, multilevel_roi_align, roi_align

# The module itself (``mrcnn_jax.ops.roi_align`` the attribute is the function, re-exported).
roi_align_lib = importlib.import_module("mrcnn_jax.ops.roi_align")


@pytest.fixture(params=["plain", "cpu_loop"])
def pool_path(request, monkeypatch):
  """Runs a test on the plain pooling and on the CPU kernel's per-RoI loop (same values)."""
  if request.param == "cpu_loop":
    monkeypatch.setattr(roi_align_lib, "pool_all_rois", pool_rois_loop)
  return request.param


def _rel_err(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _boxes(rng, b, n, img_h, img_w) -> np.ndarray:
  """[B, N, 4] random boxes, a quarter of them degenerate in some way."""
  xy = rng.uniform(-0.2, 1.0, (b, n, 2)) * [img_w, img_h]
  wh = rng.uniform(0.0, 0.8, (b, n, 2)) * [img_w, img_h]
  boxes = np.concatenate([xy, xy + wh], -1)
  special = np.array([
      [3.0, 4.0, 3.0, 9.0],                                  # zero width
      [2.0, 5.0, 8.0, 5.0],                                  # zero height
      [6.0, 6.0, 6.0, 6.0],                                  # a point
      [-5.0, -7.0, 0.3 * img_w, 0.4 * img_h],                # partly outside (top-left)
      [0.7 * img_w, 0.6 * img_h, 1.4 * img_w, 1.3 * img_h],  # partly outside (bottom-right)
      [1.2 * img_w, 1.1 * img_h, 1.5 * img_w, 1.6 * img_h],  # fully outside
      [-3.0 * img_w, -2.0, -1.5 * img_w, 0.5 * img_h],       # fully outside, left
      [-0.5 * img_w, -0.3 * img_h, 1.6 * img_w, 1.2 * img_h],  # larger than the image
      [0.0, 0.0, float(img_w), float(img_h)],                # exactly the image
      [9.0, 8.0, 4.0, 2.0],                                  # inverted (x2 < x1, y2 < y1)
  ])
  k = min(len(special), n // 4)
  boxes[:, :k] = special[:k]
  return boxes.astype(np.float32)


def _tv_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned):
  """torchvision on NHWC numpy arrays -> [B, N, oh, ow, C] numpy."""
  b, n = boxes.shape[:2]
  x = torch.from_numpy(np.array(features, np.float32)).permute(0, 3, 1, 2)
  out = torchvision.ops.roi_align(x, [torch.from_numpy(bx) for bx in boxes], output_size,
                                  scale, sampling_ratio, aligned)
  return out.permute(0, 2, 3, 1).reshape((b, n) + out.shape[2:] + (out.shape[1],)).numpy()


# (features [B, H, W, C], image (h, w), spatial_scale, output_size, sampling_ratio, aligned)
CASES = [
    ((2, 12, 17, 3), (48, 68), 0.25, (7, 7), 2, True),
    ((2, 12, 17, 3), (48, 68), 0.25, (7, 7), 2, False),
    ((1, 20, 9, 2), (20, 9), 1.0, (4, 6), 1, True),
    ((3, 9, 15, 4), (72, 120), 0.125, (5, 3), 3, False),
    ((2, 16, 16, 5), (32, 32), 0.5, (14, 14), 1, False),
    ((2, 7, 11, 2), (56, 88), 0.125, (2, 5), 3, True),
]


@pytest.mark.parametrize("shape,image,scale,output_size,ratio,aligned", CASES)
def test_matches_torchvision(shape, image, scale, output_size, ratio, aligned, pool_path):
  fn = jax.jit(lambda f, b: roi_align(f, b, output_size, spatial_scale=scale,
                                      sampling_ratio=ratio, aligned=aligned))
  for seed in range(3):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=shape).astype(np.float32)
    boxes = _boxes(rng, shape[0], 24, *image)
    got = fn(features, boxes)
    want = _tv_roi_align(features, boxes, output_size, scale, ratio, aligned)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert _rel_err(got, want) < 1e-5, (seed, _rel_err(got, want))
    assert np.abs(want).max() > 0  # the case exercises real samples, not only empty boxes


def test_all_at_once_path_matches():
  """The plain path pools all RoIs in one gather from the concatenated levels."""
  rng = np.random.default_rng(7)
  features = rng.normal(size=(2, 12, 17, 3)).astype(np.float32)
  boxes = _boxes(rng, 2, 16, 48, 68)
  for aligned in (True, False):
    got = jax.jit(lambda f, b: roi_align(f, b, (3, 5), spatial_scale=0.25, sampling_ratio=2,
                                         aligned=aligned))(features, boxes)
    want = _tv_roi_align(features, boxes, (3, 5), 0.25, 2, aligned)
    assert _rel_err(got, want) < 1e-5
  pyramid = _pyramid(rng, 2, 3)
  boxes = _fpn_boxes(rng, 2, 20)
  got = jax.jit(lambda f, b: multilevel_roi_align(f, b, 3, strides=STRIDES, sampling_ratio=2,
                                                  aligned=False))(pyramid, boxes)
  pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 3, 2)
  x = {f"p{i + 2}": torch.from_numpy(f).permute(0, 3, 1, 2) for i, f in enumerate(pyramid)}
  want = pooler(x, [torch.from_numpy(bx) for bx in boxes], [IMAGE, IMAGE])
  assert _rel_err(got, want.permute(0, 2, 3, 1).numpy().reshape(got.shape)) < 1e-5


def test_bfloat16_features(pool_path):
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.normal(size=(2, 12, 17, 4)), jnp.bfloat16)
  boxes = _boxes(rng, 2, 20, 48, 68)
  got = jax.jit(lambda f, b: roi_align(f, b, 7, spatial_scale=0.25))(features, boxes)
  assert got.dtype == jnp.bfloat16
  # The oracle sees the same (bfloat16-rounded) values, in float32.
  want = _tv_roi_align(np.asarray(features.astype(jnp.float32)), boxes, (7, 7), 0.25, 2, True)
  assert _rel_err(got.astype(jnp.float32), want) < 1e-2


@pytest.mark.parametrize("ratio,aligned", [(1, True), (2, False), (3, True)])
def test_gradient_matches_torchvision_backward(ratio, aligned, pool_path):
  for seed in range(2):
    rng = np.random.default_rng(10 + seed)
    features = rng.normal(size=(2, 10, 13, 3)).astype(np.float32)
    boxes = _boxes(rng, 2, 12, 40, 52)
    cotangent = rng.normal(size=(2, 12, 4, 3, 3)).astype(np.float32)

    def f(x):
      return roi_align(x, boxes, (4, 3), spatial_scale=0.25, sampling_ratio=ratio,
                       aligned=aligned)
    _, vjp = jax.vjp(jax.jit(f), jnp.asarray(features))
    (got,) = vjp(jnp.asarray(cotangent))

    x = torch.from_numpy(features).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    out = torchvision.ops.roi_align(x, [torch.from_numpy(bx) for bx in boxes], (4, 3), 0.25,
                                    ratio, aligned)
    out.backward(torch.from_numpy(cotangent).reshape(24, 4, 3, 3).permute(0, 3, 1, 2))
    want = x.grad.permute(0, 2, 3, 1).numpy()
    assert _rel_err(got, want) < 1e-5, (seed, _rel_err(got, want))


@pytest.mark.parametrize("aligned", [True, False])
def test_nan_box_pools_to_zero(aligned, pool_path):
  # A NaN coordinate makes every sample "outside" (weight 0), and 0 * NaN would still be NaN:
  # the box must pool to exactly 0 and leave the other boxes, and the gradient, untouched.
  rng = np.random.default_rng(12)
  features = rng.normal(size=(2, 10, 13, 3)).astype(np.float32)
  boxes = _boxes(rng, 2, 8, 40, 52)
  nan_boxes = boxes.copy()
  nan_boxes[0, 1, 0] = np.nan  # one coordinate
  nan_boxes[1, 5] = np.nan     # all four
  cotangent = rng.normal(size=(2, 8, 3, 2, 3)).astype(np.float32)

  @jax.jit
  def pool_and_grad(f, b, ct):
    out, vjp = jax.vjp(lambda x: roi_align(x, b, (3, 2), spatial_scale=0.25, aligned=aligned),
                       f)
    return out, vjp(ct)[0]

  got, got_grad = pool_and_grad(features, nan_boxes, cotangent)
  want, _ = pool_and_grad(features, boxes, cotangent)
  ok = np.ones((2, 8), bool)
  ok[0, 1] = ok[1, 5] = False
  np.testing.assert_array_equal(np.asarray(got)[~ok], 0.0)
  np.testing.assert_array_equal(np.asarray(got)[ok], np.asarray(want)[ok])
  # The gradient is that of the other boxes alone.
  _, want_grad = pool_and_grad(features, boxes, np.where(ok[..., None, None, None], cotangent, 0))
  np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=1e-6)


def test_vmap_over_leading_axis():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(3, 1, 9, 11, 2)).astype(np.float32)
  boxes = _boxes(rng, 3, 8, 36, 44)[:, None]
  fn = lambda f, b: roi_align(f, b, 3, spatial_scale=0.25)
  got = jax.jit(jax.vmap(fn))(features, boxes)
  want = jax.jit(fn)(features.reshape(3, 9, 11, 2), boxes.reshape(3, 8, 4))
  np.testing.assert_allclose(got[:, 0], want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Multilevel (FPN) pooling.

STRIDES = (4, 8, 16, 32)
IMAGE = (96, 128)  # a multiple of the largest stride, so torchvision infers scales 1/stride


def _pyramid(rng, b, c, dtype=np.float32):
  return [rng.normal(size=(b, IMAGE[0] // s, IMAGE[1] // s, c)).astype(dtype) for s in STRIDES]


def _fpn_boxes(rng, b, n):
  """Boxes of sizes from ~2 to ~700 pixels so that every level gets RoIs, plus degenerate ones."""
  side = np.exp(rng.uniform(np.log(2.0), np.log(700.0), (b, n, 2)))
  xy = rng.uniform(-0.2, 1.0, (b, n, 2)) * [IMAGE[1], IMAGE[0]]
  boxes = np.concatenate([xy, xy + side], -1)
  boxes[:, 0] = [5.0, 5.0, 5.0, 40.0]       # zero width -> lowest level
  boxes[:, 1] = [-200.0, -150.0, 400.0, 300.0]  # outside and large -> top level
  return boxes.astype(np.float32)


def _tv_levels(boxes):
  mapper = torchvision.ops.poolers.initLevelMapper(2, 5)
  return mapper([torch.from_numpy(bx) for bx in boxes]).numpy().reshape(boxes.shape[:2]) + 2


def test_assign_fpn_levels_matches_level_mapper():
  rng = np.random.default_rng(0)
  boxes = _fpn_boxes(rng, 2, 200)
  got = jax.jit(lambda b: assign_fpn_levels(b, 2, 5))(boxes)
  want = _tv_levels(boxes)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)
  assert set(np.unique(want)) == {2, 3, 4, 5}
  # The canonical box: a 224 x 224 box lands on level 4, a 112 x 112 box on level 3.
  np.testing.assert_array_equal(
      assign_fpn_levels(jnp.array([[0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 112.0, 112.0]]), 2, 5),
      [4, 3])


@pytest.mark.parametrize("output_size,ratio", [((7, 7), 2), ((4, 6), 1)])
def test_multilevel_matches_multiscale_roi_align(output_size, ratio, pool_path):
  pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size, ratio)
  fn = jax.jit(lambda f, b: multilevel_roi_align(f, b, output_size, strides=STRIDES,
                                                 sampling_ratio=ratio, aligned=False))
  for seed in range(3):
    rng = np.random.default_rng(seed)
    features = _pyramid(rng, 2, 3)
    boxes = _fpn_boxes(rng, 2, 40)
    got = fn(features, boxes)
    x = {f"p{i + 2}": torch.from_numpy(f).permute(0, 3, 1, 2) for i, f in enumerate(features)}
    want = pooler(x, [torch.from_numpy(bx) for bx in boxes], [IMAGE, IMAGE])
    want = want.permute(0, 2, 3, 1).numpy().reshape(got.shape)
    assert _rel_err(got, want) < 1e-5, (seed, _rel_err(got, want))


def test_multilevel_aligned_equals_per_level_roi_align():
  rng = np.random.default_rng(5)
  features = _pyramid(rng, 2, 2)
  boxes = _fpn_boxes(rng, 2, 30)
  got = jax.jit(lambda f, b: multilevel_roi_align(f, b, 5, strides=STRIDES, sampling_ratio=2,
                                                  aligned=True))(features, boxes)
  levels = _tv_levels(boxes)
  want = np.zeros_like(np.asarray(got))
  for i, s in enumerate(STRIDES):
    per_level = _tv_roi_align(features[i], boxes, (5, 5), 1.0 / s, 2, True)
    want[levels == i + 2] = per_level[levels == i + 2]
  assert _rel_err(got, want) < 1e-5


def test_multilevel_gradient_and_bfloat16(pool_path):
  rng = np.random.default_rng(6)
  features = _pyramid(rng, 2, 3)
  boxes = _fpn_boxes(rng, 2, 20)
  cotangent = rng.normal(size=(2, 20, 3, 3, 3)).astype(np.float32)
  fn = lambda f: multilevel_roi_align(f, boxes, 3, strides=STRIDES, sampling_ratio=2,
                                      aligned=False)
  _, vjp = jax.vjp(jax.jit(fn), [jnp.asarray(f) for f in features])
  (got,) = vjp(jnp.asarray(cotangent))

  x = [torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
       for f in features]
  pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 3, 2)
  out = pooler({f"p{i + 2}": t for i, t in enumerate(x)}, [torch.from_numpy(bx) for bx in boxes],
               [IMAGE, IMAGE])
  out.backward(torch.from_numpy(cotangent).reshape(40, 3, 3, 3).permute(0, 3, 1, 2))
  for g, t in zip(got, x):
    assert _rel_err(g, t.grad.permute(0, 2, 3, 1).numpy()) < 1e-5

  features_bf16 = [jnp.asarray(f, jnp.bfloat16) for f in features]
  got_bf16 = jax.jit(fn)(features_bf16)
  assert got_bf16.dtype == jnp.bfloat16
  want = jax.jit(fn)([f.astype(jnp.float32) for f in features_bf16])
  assert _rel_err(got_bf16.astype(jnp.float32), want) < 1e-2


# ---------------------------------------------------------------------------------------------
# Argument checks.

def test_errors():
  f = jnp.zeros((1, 8, 8, 2))
  b = jnp.zeros((1, 3, 4))
  with pytest.raises(ValueError, match="features"):
    roi_align(jnp.zeros((8, 8, 2)), b, 2)
  with pytest.raises(ValueError, match="boxes"):
    roi_align(f, jnp.zeros((3, 4)), 2)
  with pytest.raises(ValueError, match="boxes"):
    roi_align(f, jnp.zeros((1, 3, 5)), 2)
  with pytest.raises(ValueError, match="batch"):
    roi_align(f, jnp.zeros((2, 3, 4)), 2)
  with pytest.raises(ValueError, match="adaptive"):
    roi_align(f, b, 2, sampling_ratio=0)
  with pytest.raises(ValueError, match="adaptive"):
    multilevel_roi_align([f], b, 2, strides=(4,), sampling_ratio=-1)
  with pytest.raises(ValueError, match="stride"):
    multilevel_roi_align([f, f], b, 2, strides=(4,), sampling_ratio=2)
  with pytest.raises(ValueError, match="powers of two"):
    multilevel_roi_align([f, f], b, 2, strides=(4, 12), sampling_ratio=2)
  with pytest.raises(ValueError, match="features"):
    multilevel_roi_align([jnp.zeros((8, 8, 2))], b, 2, strides=(4,), sampling_ratio=2)
  with pytest.raises(ValueError, match="channels"):
    multilevel_roi_align([f, jnp.zeros((1, 4, 4, 3))], b, 2, strides=(4, 8), sampling_ratio=2)
  with pytest.raises(ValueError, match="boxes"):
    assign_fpn_levels(jnp.zeros((3, 5)), 2, 5)


def test_cpu_loop_gradients_equal_autodiff_of_one_gather():
  """The CPU loop has a hand-written backward; check it, boxes included, against JAX autodiff
  of the one-gather path (torchvision has no gradient wrt boxes to compare with)."""
  rng = np.random.default_rng(8)
  features = [jnp.asarray(f) for f in _pyramid(rng, 2, 3)]
  boxes = jnp.asarray(_fpn_boxes(rng, 2, 16))
  cotangent = jnp.asarray(rng.normal(size=(2, 16, 3, 2, 3)).astype(np.float32))

  def loss(f, b, pool_rois):
    out = multilevel_roi_align(f, b, (3, 2), strides=STRIDES, sampling_ratio=2, aligned=True,
                               pool_rois=pool_rois)
    return jnp.sum(out * cotangent)
  got = jax.jit(jax.grad(lambda f, b: loss(f, b, pool_rois_loop), argnums=(0, 1)))(features,
                                                                                   boxes)
  want = jax.jit(jax.grad(lambda f, b: loss(f, b, None), argnums=(0, 1)))(features, boxes)
  for g, w in zip(got[0], want[0]):
    assert _rel_err(g, w) < 1e-5
  assert _rel_err(got[1], want[1]) < 1e-4
  assert np.abs(np.asarray(want[1])).max() > 0
