"""Tests for mrcnn_jax.ops.matching against torchvision's Matcher, under jax.jit."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils

from mrcnn_jax.ops.matching import match_boxes

THRESHOLDS = [(0.7, 0.3), (0.5, 0.5)]


def random_boxes(rng, n, size=100.0):
  x1 = rng.uniform(0, size, n)
  y1 = rng.uniform(0, size, n)
  return np.stack(
      [x1, y1, x1 + rng.uniform(2, 40, n), y1 + rng.uniform(2, 40, n)], axis=1).astype(np.float32)


def iou_matrix(rng, g, p, quantize=False):
  """[g, p] IoU of random GT vs predictions; some predictions are jittered GT copies (high IoU).

  With ``quantize`` the values are rounded to 0.1, which creates ties both along rows (the
  low-quality rule's "including ties") and along columns (argmax's first-index rule).
  """
  gt = random_boxes(rng, g)
  preds = random_boxes(rng, p)
  k = min(g, p // 2)
  side = np.concatenate([gt[:k, 2:] - gt[:k, :2]] * 2, axis=1)
  preds[:k] = gt[:k] + (rng.normal(0, 0.05, (k, 4)) * side).astype(np.float32)
  iou = torchvision.ops.box_iou(torch.from_numpy(gt), torch.from_numpy(preds)).numpy()
  if quantize:
    iou = np.round(iou, 1).astype(np.float32)
  return iou


def torchvision_match(iou, high, low, allow_low):
  return det_utils.Matcher(high, low, allow_low)(torch.from_numpy(iou.copy())).numpy()


jit_match = jax.jit(match_boxes, static_argnums=(1, 2, 3))


@pytest.mark.parametrize("high,low", THRESHOLDS)
@pytest.mark.parametrize("allow_low", [False, True])
@pytest.mark.parametrize("seed,g,p,quantize", [
    (0, 1, 5, False), (1, 4, 30, False), (2, 9, 64, False), (3, 6, 40, True), (4, 12, 20, True)])
def test_matches_torchvision(high, low, allow_low, seed, g, p, quantize):
  rng = np.random.default_rng(seed)
  iou = iou_matrix(rng, g, p, quantize)
  got = np.asarray(jit_match(iou, high, low, allow_low))
  ref = torchvision_match(iou, high, low, allow_low)
  assert got.dtype == np.int32 and got.shape == (p,)
  np.testing.assert_array_equal(got, ref)
  # The inputs do exercise every outcome the case allows.
  assert np.any(got >= 0)
  if not allow_low:
    assert np.any(got == -1)


def test_low_quality_rule_matters():
  # GT 1 overlaps nothing above the threshold; its best prediction is claimed anyway.
  iou = np.array([[0.9, 0.1, 0.0], [0.2, 0.4, 0.1]], np.float32)
  np.testing.assert_array_equal(np.asarray(jit_match(iou, 0.7, 0.3, False)), [0, -2, -1])
  np.testing.assert_array_equal(np.asarray(jit_match(iou, 0.7, 0.3, True)), [0, 1, -1])
  np.testing.assert_array_equal(torchvision_match(iou, 0.7, 0.3, True), [0, 1, -1])


@pytest.mark.parametrize("high,low", THRESHOLDS)
@pytest.mark.parametrize("allow_low", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_gt_rows_never_match(high, low, allow_low, seed):
  rng = np.random.default_rng(seed)
  g_valid, g_pad, p = 5, 4, 40
  iou_valid = iou_matrix(rng, g_valid, p, quantize=seed == 2)
  # Padding rows interleaved with real ones, filled with high qualities that would win if the
  # mask were ignored.
  rows = np.sort(rng.choice(g_valid + g_pad, g_valid, replace=False))
  valid = np.zeros(g_valid + g_pad, bool)
  valid[rows] = True
  iou = rng.uniform(0.5, 1.0, (g_valid + g_pad, p)).astype(np.float32)
  iou[rows] = iou_valid
  got = np.asarray(jit_match(iou, high, low, allow_low, valid))
  ref = torchvision_match(iou_valid, high, low, allow_low)
  want = np.where(ref >= 0, rows[np.maximum(ref, 0)], ref)  # torchvision's row -> padded row
  np.testing.assert_array_equal(got, want)
  assert not np.any(np.isin(got, np.nonzero(~valid)[0]))


@pytest.mark.parametrize("allow_low", [False, True])
def test_no_valid_gt_gives_all_below_low(allow_low):
  iou = np.full((3, 7), 0.9, np.float32)
  got = np.asarray(jit_match(iou, 0.7, 0.3, allow_low, np.zeros(3, bool)))
  np.testing.assert_array_equal(got, np.full(7, -1))
  got0 = np.asarray(match_boxes(np.zeros((0, 7), np.float32), 0.7, 0.3, allow_low))
  np.testing.assert_array_equal(got0, np.full(7, -1))


def test_vmap_over_images():
  rng = np.random.default_rng(7)
  ious = np.stack([iou_matrix(rng, 6, 30) for _ in range(3)])
  valid = np.array([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 0, 1, 0, 1, 0]], bool)
  fn = jax.jit(jax.vmap(lambda i, v: match_boxes(i, 0.7, 0.3, True, v)))
  got = np.asarray(fn(ious, valid))
  for b in range(3):
    rows = np.nonzero(valid[b])[0]
    ref = torchvision_match(ious[b][rows], 0.7, 0.3, True)
    np.testing.assert_array_equal(got[b], np.where(ref >= 0, rows[np.maximum(ref, 0)], ref))


@pytest.mark.parametrize(
    "call",
    [
        lambda: match_boxes(np.zeros((4,)), 0.7, 0.3, False),
        lambda: match_boxes(np.zeros((2, 4, 3)), 0.7, 0.3, False),
        lambda: match_boxes(np.zeros((2, 4)), 0.7, 0.3, False, np.ones((3,), bool)),
        lambda: match_boxes(np.zeros((2, 4)), 0.7, 0.3, False, np.ones((2, 1), bool)),
        lambda: match_boxes(np.zeros((2, 4)), 0.3, 0.7, False),
    ],
)
def test_bad_arguments_raise(call):
  with pytest.raises(ValueError):
    call()
