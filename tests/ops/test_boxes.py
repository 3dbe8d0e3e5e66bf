"""Tests for mrcnn_jax.ops.boxes against torchvision (the oracle), under jax.jit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils

from mrcnn_jax.ops import boxes as B

IMAGE_HW = (60, 80)


def random_boxes(rng: np.random.Generator, n: int, hw=IMAGE_HW) -> np.ndarray:
  """[n, 4] float32 xyxy boxes, mostly proper, with degenerate cases mixed in.

  Degenerate rows: zero width, zero height, a point, fully outside the image, partly outside,
  and larger than the image on every side.
  """
  h, w = hw
  x1 = rng.uniform(-0.2 * w, w, n)
  y1 = rng.uniform(-0.2 * h, h, n)
  bw = rng.uniform(0.5, 0.6 * w, n)
  bh = rng.uniform(0.5, 0.6 * h, n)
  out = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)
  special = np.array(
      [
          [10.0, 10.0, 10.0, 30.0],  # zero width
          [5.0, 20.0, 25.0, 20.0],  # zero height
          [7.0, 7.0, 7.0, 7.0],  # a point
          [w + 5.0, h + 5.0, w + 25.0, h + 30.0],  # fully outside (bottom right)
          [-40.0, -30.0, -10.0, -2.0],  # fully outside (top left)
          [-10.0, 5.0, 20.0, h + 10.0],  # partly outside
          [-50.0, -50.0, w + 50.0, h + 50.0],  # larger than the image
      ],
      np.float32,
  )
  k = min(len(special), n // 2)
  rows = rng.choice(n, size=k, replace=False)
  out[rows] = special[:k]
  return out


def rel_err(got, ref) -> float:
  got = np.asarray(got, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


@pytest.mark.parametrize("seed,n,m", [(0, 1, 1), (1, 7, 13), (2, 40, 25), (3, 64, 3)])
def test_box_iou_matches_torchvision(seed, n, m):
  rng = np.random.default_rng(seed)
  a = random_boxes(rng, n)
  b = random_boxes(rng, m)
  got = np.asarray(jax.jit(B.box_iou)(a, b))
  ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  assert got.shape == (n, m) and got.dtype == np.float32
  finite = np.isfinite(ref)  # torchvision gives NaN where the union is 0; compared below
  np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-6, atol=1e-7)
  assert np.all(got[~finite] == 0.0)
  assert np.all((got >= 0) & (got <= 1))


def test_box_iou_known_values_and_zero_union():
  a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
  b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [0, 0, 0, 0], [20, 20, 30, 30]], np.float32)
  got = np.asarray(jax.jit(B.box_iou)(a, b))
  want = np.array([[50 / 150, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The zero-union entry must not poison gradients (padded GT rows are all zeros).
  grad = jax.grad(lambda x: B.box_iou(x, b).sum())(jnp.asarray(a))
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("seed,shape", [(0, (9,)), (1, (3, 5)), (2, (2, 3, 4))])
def test_box_area_matches_torchvision(seed, shape):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, int(np.prod(shape))).reshape(*shape, 4)
  got = np.asarray(jax.jit(B.box_area)(boxes))
  ref = torchvision.ops.box_area(torch.from_numpy(boxes)).numpy()
  assert got.shape == shape
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("seed,hw", [(0, (60, 80)), (1, (33, 17)), (2, (1, 1))])
def test_clip_boxes_matches_torchvision(seed, hw):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 24, hw=(60, 80)).reshape(2, 12, 4)
  ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), hw).numpy()
  got_static = np.asarray(jax.jit(B.clip_boxes, static_argnums=1)(boxes, hw))
  np.testing.assert_array_equal(got_static, ref)
  # A traced size, vmapped: each image clipped to its own (h, w).
  sizes = np.array([hw, (hw[0] + 7, hw[1] + 3)], np.int32)
  got = np.asarray(jax.jit(jax.vmap(B.clip_boxes))(boxes, sizes))
  np.testing.assert_array_equal(got[0], ref[0])
  ref1 = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes[1]), tuple(sizes[1])).numpy()
  np.testing.assert_array_equal(got[1], ref1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_convert_matches_torchvision_and_round_trips(seed):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 30).reshape(5, 6, 4)
  t = torch.from_numpy(boxes)
  cxcywh = np.asarray(jax.jit(B.xyxy_to_cxcywh)(boxes))
  np.testing.assert_allclose(
      cxcywh, torchvision.ops.box_convert(t, "xyxy", "cxcywh").numpy(), rtol=1e-6, atol=1e-5)
  back = np.asarray(jax.jit(B.cxcywh_to_xyxy)(cxcywh))
  np.testing.assert_allclose(
      back, torchvision.ops.box_convert(torch.from_numpy(cxcywh.copy()), "cxcywh", "xyxy").numpy(),
      rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(back, boxes, rtol=1e-6, atol=1e-4)


def proper_boxes(rng, n):
  """Boxes with positive width and height (valid anchors / targets of the coder)."""
  x1 = rng.uniform(-20, 100, n)
  y1 = rng.uniform(-20, 100, n)
  return np.stack(
      [x1, y1, x1 + rng.uniform(1, 80, n), y1 + rng.uniform(1, 80, n)], axis=1).astype(np.float32)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("seed,n", [(0, 5), (1, 50)])
def test_encode_matches_torchvision(weights, seed, n):
  rng = np.random.default_rng(seed)
  gt = proper_boxes(rng, n)
  anchors = proper_boxes(rng, n)
  coder = det_utils.BoxCoder(weights)
  ref = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
  got = np.asarray(jax.jit(lambda b, a: B.encode_boxes(b, a, weights))(gt, anchors))
  assert rel_err(got, ref) < 1e-6
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_encode_degenerate_target_matches_torchvision():
  anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
  gt = np.array([[2, 2, 2, 8], [1, 1, 9, 1]], np.float32)  # zero width / zero height
  ref = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(
      torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
  got = np.asarray(jax.jit(B.encode_boxes)(gt, anchors))
  np.testing.assert_allclose(got, ref)  # -inf in the same places
  assert got[0, 2] == -np.inf and got[1, 3] == -np.inf


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("seed,n,k", [(0, 6, 1), (1, 40, 3)])
def test_decode_matches_torchvision_with_clamp(weights, seed, n, k):
  rng = np.random.default_rng(seed)
  anchors = proper_boxes(rng, n)
  deltas = rng.normal(0, 1, (n, k, 4)).astype(np.float32)
  # Large dw/dh (after the weights) exercise the log(1000/16) clamp; huge ones would give inf
  # without it.
  deltas[0, :, 2:] = 50.0 * np.asarray(weights[2:], np.float32)
  deltas[n - 1, 0, 2] = 4.2 * weights[2]
  coder = det_utils.BoxCoder(weights)
  ref = coder.decode_single(
      torch.from_numpy(deltas.reshape(n, 4 * k)), torch.from_numpy(anchors)).numpy()
  ref = ref.reshape(n, k, 4)
  got = np.asarray(
      jax.jit(lambda d, a: B.decode_boxes(d, a, weights))(deltas, anchors[:, None, :]))
  assert got.shape == (n, k, 4)
  assert np.all(np.isfinite(got))
  assert rel_err(got, ref) < 1e-6
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
  # The clamp really bounds the size: at most 1000/16 times the anchor.
  aw = anchors[0, 2] - anchors[0, 0]
  np.testing.assert_allclose(got[0, :, 2] - got[0, :, 0], aw * 1000 / 16, rtol=1e-5)


def test_decode_custom_clip():
  anchors = np.array([[0, 0, 10, 20]], np.float32)
  deltas = np.array([[0, 0, 3.0, 3.0]], np.float32)
  got = np.asarray(jax.jit(lambda d, a: B.decode_boxes(d, a, clip=math.log(2.0)))(deltas, anchors))
  np.testing.assert_allclose(got, [[-5, -10, 15, 30]], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_encode_decode_round_trip(weights, seed):
  rng = np.random.default_rng(seed)
  gt = proper_boxes(rng, 32).reshape(4, 8, 4)
  anchors = proper_boxes(rng, 32).reshape(4, 8, 4)
  fn = jax.jit(lambda b, a: B.decode_boxes(B.encode_boxes(b, a, weights), a, weights))
  np.testing.assert_allclose(np.asarray(fn(gt, anchors)), gt, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("min_size", [0.0, 1e-3, 2.0, 15.0])
def test_small_box_mask_matches_torchvision(min_size):
  rng = np.random.default_rng(4)
  boxes = random_boxes(rng, 40)
  keep = torchvision.ops.remove_small_boxes(torch.from_numpy(boxes), min_size).numpy()
  got = np.asarray(jax.jit(B.small_box_mask, static_argnums=1)(boxes, min_size))
  np.testing.assert_array_equal(np.nonzero(got)[0], keep)


@pytest.mark.parametrize(
    "call",
    [
        lambda: B.box_iou(np.zeros((3, 4)), np.zeros((2, 3, 4))),
        lambda: B.box_iou(np.zeros((4,)), np.zeros((2, 4))),
        lambda: B.box_iou(np.zeros((3, 5)), np.zeros((2, 4))),
        lambda: B.box_area(np.zeros(())),
        lambda: B.box_area(np.zeros((3, 2))),
        lambda: B.clip_boxes(np.zeros((3, 3)), (10, 10)),
        lambda: B.clip_boxes(np.zeros((3, 4)), np.zeros((3,))),
        lambda: B.clip_boxes(np.zeros((3, 4)), (10, 10, 3)),
        lambda: B.xyxy_to_cxcywh(np.zeros((2, 5))),
        lambda: B.cxcywh_to_xyxy(np.zeros(())),
        lambda: B.encode_boxes(np.zeros((2, 4)), np.zeros((2, 3))),
        lambda: B.decode_boxes(np.zeros((2, 2)), np.zeros((2, 4))),
        lambda: B.small_box_mask(np.zeros((7,)), 1.0),
    ],
)
def test_wrong_shapes_raise(call):
  with pytest.raises(ValueError):
    call()
