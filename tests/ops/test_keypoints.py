"""Tests for mrcnn_jax.ops.keypoints and the keypoint loss, against torchvision's own functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import (
    heatmaps_to_keypoints as tv_heatmaps_to_keypoints,
    keypointrcnn_loss,
    keypoints_to_heatmap,
)

from mrcnn_jax.modeling.losses import keypoint_loss
from mrcnn_jax.ops.keypoints import heatmaps_to_keypoints, keypoint_targets

_targets_jit = jax.jit(keypoint_targets, static_argnums=3)
_decode_jit = jax.jit(heatmaps_to_keypoints, static_argnums=2)


# ----------------------------------------------------------------------------- keypoint_targets

def _keypoint_scene(rng, g, k, r, s):
  """GT keypoints, RoIs around their GT boxes (several per GT) and the matches.

  Half the RoIs have integer corners and sides that are multiples of ``s``, where integer
  keypoints land exactly on bin edges; some keypoints are put exactly on their RoI's edges.
  """
  gt_xy = rng.uniform(0.0, 80.0, (g, 2))
  gt_wh = rng.uniform(4.0, 40.0, (g, 2))
  matched = rng.integers(0, g, r).astype(np.int32)
  matched[:g] = np.arange(g)  # every GT matched, most of them several times
  jitter = rng.uniform(-0.3, 0.3, (r, 4)) * np.tile(gt_wh[matched], 2)
  rois = np.concatenate([gt_xy, gt_xy + gt_wh], 1)[matched] + jitter
  half = r // 2
  rois[:half, :2] = np.round(rois[:half, :2])
  wh = rois[:half, 2:] - rois[:half, :2]
  rois[:half, 2:] = rois[:half, :2] + s * np.maximum(np.round(wh / s), 1)
  rois = rois.astype(np.float32)
  # Keypoints anywhere in the GT box grown by 30%: inside and outside their RoIs.
  u = rng.uniform(-0.3, 1.3, (g, k, 2))
  xy = gt_xy[:, None] + u * gt_wh[:, None]
  xy[:, : k // 2] = np.round(xy[:, : k // 2])  # integers: bin edges of the integer RoIs
  kp = np.concatenate([xy, rng.integers(0, 3, (g, k, 1))], -1).astype(np.float32)
  # Exactly on an RoI's x2, y2, x1 and y1 (a RoI matched to that GT), mid-way on the other axis.
  for j, (roi_i, axis, corner) in enumerate(((0, 0, 2), (1, 1, 3), (2, 0, 0), (3, 1, 1),
                                             (half, 0, 2), (half + 1, 1, 3))):
    kp[matched[roi_i], j % k, axis] = rois[roi_i, corner]
    kp[matched[roi_i], j % k, 1 - axis] = rois[roi_i, [1 - axis, 3 - axis]].mean()
    kp[matched[roi_i], j % k, 2] = 2.0
  return kp, rois, matched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keypoint_targets_equal_torchvision(seed):
  rng = np.random.default_rng(seed)
  g, k, r, s = 4, 9, 40, 8
  kp, rois, matched = _keypoint_scene(rng, g, k, r, s)
  targets, valid = _targets_jit(kp, rois, matched, s)
  want_t, want_v = keypoints_to_heatmap(torch.from_numpy(kp[matched]), torch.from_numpy(rois), s)
  assert targets.shape == (r, k) and targets.dtype == jnp.int32 and valid.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(valid), want_v.numpy().astype(bool))
  np.testing.assert_array_equal(np.asarray(targets), want_t.numpy())
  # The scene exercises every rule: invalid by visibility and by position, the x2/y2 rule.
  want_v = want_v.numpy().astype(bool)
  assert want_v.mean() > 0.2 and (~want_v & (kp[matched][..., 2] > 0)).any()
  assert want_t[0, 0] % s == s - 1 and want_t[1, 1] // s == s - 1  # the x2 and y2 points


def test_keypoint_targets_unmatched_rows_and_vmap():
  rng = np.random.default_rng(3)
  g, k, r, s = 3, 5, 12, 6
  kps, roiss, matcheds = zip(*[_keypoint_scene(rng, g, k, r, s) for _ in range(2)])
  kps, roiss, matcheds = np.stack(kps), np.stack(roiss), np.stack(matcheds)
  matcheds[1, 5:] = -1  # no GT: all invalid
  targets, valid = jax.jit(jax.vmap(lambda a, b, c: keypoint_targets(a, b, c, s)))(
      kps, roiss, matcheds)
  for i in range(2):
    want_t, want_v = keypoints_to_heatmap(torch.from_numpy(kps[i][matcheds[i]]),
                                          torch.from_numpy(roiss[i]), s)
    want_v = want_v.numpy().astype(bool) & (matcheds[i] >= 0)[:, None]
    np.testing.assert_array_equal(np.asarray(valid[i]), want_v)
    np.testing.assert_array_equal(np.asarray(targets[i]), np.where(want_v, want_t.numpy(), 0))
  assert not np.asarray(valid[1, 5:]).any() and not np.asarray(targets[1, 5:]).any()


def test_keypoint_targets_without_gt_and_bad_shapes():
  t, v = keypoint_targets(np.zeros((0, 4, 3), np.float32), np.ones((3, 4), np.float32),
                          np.zeros(3, np.int32), 8)
  assert t.shape == (3, 4) and not np.asarray(v).any()
  with pytest.raises(ValueError, match="keypoints"):
    keypoint_targets(np.zeros((2, 4, 2)), np.ones((3, 4)), np.zeros(3, np.int32), 8)
  with pytest.raises(ValueError, match="matched"):
    keypoint_targets(np.zeros((2, 4, 3)), np.ones((3, 4)), np.zeros(2, np.int32), 8)


# ------------------------------------------------------------------------ heatmaps_to_keypoints

def _rois_with_sides(rng, sides):
  """RoIs with the given (w, h) sides (exact in float32) at fractional offsets."""
  sides = np.asarray(sides, np.float32)
  xy = np.round(rng.uniform(-30.0, 400.0, (len(sides), 2)) * 4) / 4  # exact quarter pixels
  return np.concatenate([xy, xy + sides], 1).astype(np.float32)


def _peaked_maps(rng, d, k, s, lo=0.0, hi=None, sigma=(0.7, 3.0)):
  """Round Gaussian peaks (centres in [lo, hi] heatmap pixels) plus a little noise."""
  hi = s - 1 if hi is None else hi
  c = rng.uniform(lo, hi, (d, k, 2, 1, 1))
  sig = rng.uniform(*sigma, (d, k, 1, 1))
  yy, xx = np.mgrid[0:s, 0:s]
  maps = 8.0 * np.exp(-((xx - c[:, :, 0]) ** 2 + (yy - c[:, :, 1]) ** 2) / (2 * sig ** 2))
  return (maps + 0.01 * rng.normal(size=maps.shape)).astype(np.float32)


def _tv_decode(maps, rois):
  xy, scores = tv_heatmaps_to_keypoints(torch.from_numpy(maps), torch.from_numpy(rois))
  return xy.numpy()[..., :2], scores.numpy()


def _decode_on_capped_grid(maps, rois, cap):
  """torchvision's decoding with each resized side capped at ``cap`` pixels (test reference).

  Built from ``F.interpolate`` like torchvision's loop; for sides <= cap it is torchvision's.
  """
  d, k = maps.shape[:2]
  xy, scores = np.zeros((d, k, 2), np.float32), np.zeros((d, k), np.float32)
  for i in range(d):
    side = torch.from_numpy(rois[i, 2:] - rois[i, :2]).clamp(min=1)
    n = [min(int(torch.ceil(v)), cap) for v in side]
    up = F.interpolate(torch.from_numpy(maps[i])[:, None], size=(n[1], n[0]), mode="bicubic",
                       align_corners=False)[:, 0].reshape(k, -1)
    pos = up.argmax(1)
    xi, yi = pos % n[0], pos // n[0]
    xy[i, :, 0] = ((xi.float() + 0.5) * (side[0] / n[0]) + float(rois[i, 0])).numpy()
    xy[i, :, 1] = ((yi.float() + 0.5) * (side[1] / n[1]) + float(rois[i, 1])).numpy()
    scores[i] = up[torch.arange(k), pos].numpy()
  return xy, scores


_CAP = 40  # max_resize of the tests: small maps, small cap
_SIDES_UP_TO_CAP = [
    (0.3, 0.3), (1.0, 1.0), (0.7, 1.5), (2.25, 7.75), (9.5, 10.0), (10.0, 10.0), (10.25, 3.0),
    (39.5, 40.0), (40.0, 39.75), (40.0, 40.0), (17.5, 33.25), (-2.0, 5.0),  # x2 < x1: side 1
]


@pytest.mark.parametrize("peaked", [False, True])
def test_heatmaps_to_keypoints_equal_torchvision_up_to_the_cap(peaked):
  rng = np.random.default_rng(4 + peaked)
  k, s, n_random = 3, 10, 20
  sides = _SIDES_UP_TO_CAP + [tuple(v) for v in rng.uniform(0.5, _CAP, (n_random, 2))]
  rois = _rois_with_sides(rng, sides)
  d = len(rois)
  maps = (_peaked_maps(rng, d, k, s) if peaked
          else rng.normal(size=(d, k, s, s)).astype(np.float32))
  xy, scores = _decode_jit(maps, rois, _CAP)
  assert xy.shape == (d, k, 2) and scores.shape == (d, k) and xy.dtype == jnp.float32
  want_xy, want_scores = _tv_decode(maps, rois)
  np.testing.assert_allclose(np.asarray(xy), want_xy, rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-6)
  # The capped reference is torchvision's below the cap (it checks the test below).
  ref_xy, ref_scores = _decode_on_capped_grid(maps, rois, _CAP)
  np.testing.assert_allclose(ref_xy, want_xy, rtol=0, atol=1e-4)
  np.testing.assert_allclose(ref_scores, want_scores, rtol=1e-6)


def test_heatmaps_to_keypoints_ties_take_the_first_maximum():
  # Constant maps and a flat top: every (or many) upsampled pixels tie exactly.
  s, k = 6, 2
  maps = np.zeros((3, k, s, s), np.float32)
  maps[:, 1, 2:4, 1:5] = 3.0
  rois = _rois_with_sides(np.random.default_rng(5), [(6.0, 6.0), (12.0, 12.0), (30.0, 25.5)])
  xy, scores = _decode_jit(maps, rois, _CAP)
  want_xy, want_scores = _tv_decode(maps, rois)
  np.testing.assert_allclose(np.asarray(xy), want_xy, rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-6)


def test_heatmaps_to_keypoints_above_the_cap():
  rng = np.random.default_rng(6)
  k, s = 3, 10
  sides = [(40.25, 12.0), (41.0, 41.0), (7.0, 57.5), (150.0, 90.25), (400.0, 333.0)]
  sides += [tuple(v) for v in rng.uniform(_CAP + 0.5, 12 * _CAP, (15, 2))]
  rois = _rois_with_sides(rng, sides)
  d = len(rois)
  # Round peaks inside the heatmap (the stated bound's case), and plain noise.
  maps = np.concatenate([_peaked_maps(rng, d, k, s, lo=2.0, hi=s - 3.0, sigma=(1.0, 2.5)),
                         rng.normal(size=(d, k, s, s)).astype(np.float32)], 1)
  xy, scores = _decode_jit(maps, rois, _CAP)
  xy, scores = np.asarray(xy), np.asarray(scores)
  # Exactly torchvision's computation on the capped grid.
  ref_xy, ref_scores = _decode_on_capped_grid(maps, rois, _CAP)
  np.testing.assert_allclose(xy, ref_xy, rtol=0, atol=1e-4)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
  # Round peaks: within one cell (side / max_resize) of torchvision's full-size answer.
  want_xy, _ = _tv_decode(maps[:, :k], rois)
  cell = np.maximum(rois[:, 2:] - rois[:, :2], 1.0) / np.minimum(
      np.ceil(np.maximum(rois[:, 2:] - rois[:, :2], 1.0)), _CAP)
  assert np.all(np.abs(xy[:, :k] - want_xy) <= cell[:, None, :] + 1e-3)
  below = np.ceil(rois[:, 2:] - rois[:, :2]) <= _CAP  # sides below the cap stay exact
  np.testing.assert_allclose(np.where(below[:, None], xy[:, :k], 0),
                             np.where(below[:, None], want_xy, 0), rtol=0, atol=1e-4)


def test_heatmaps_to_keypoints_vmap_bfloat16_and_bad_shapes():
  rng = np.random.default_rng(7)
  maps = rng.normal(size=(2, 4, 3, 8, 8)).astype(np.float32)
  rois = np.stack([_rois_with_sides(rng, rng.uniform(0.5, 30, (4, 2))) for _ in range(2)])
  xy, scores = jax.jit(jax.vmap(lambda m, r: heatmaps_to_keypoints(m, r, 32)))(
      jnp.asarray(maps, jnp.bfloat16), rois)  # sides <= 30: below the cap
  for i in range(2):
    # A bfloat16 input is decoded in float32: the result of its float32 copy.
    m32 = np.array(jnp.asarray(maps[i], jnp.bfloat16).astype(jnp.float32))
    want_xy, want_scores = _tv_decode(m32, rois[i])
    np.testing.assert_allclose(np.asarray(xy[i]), want_xy, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(scores[i]), want_scores, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="maps"):
    heatmaps_to_keypoints(maps[0, :, :, :7], rois[0])
  with pytest.raises(ValueError, match="rois"):
    heatmaps_to_keypoints(maps[0], rois[0, :3])


# -------------------------------------------------------------------------------- keypoint_loss

def test_keypoint_loss_equals_keypointrcnn_loss_with_gradient():
  """Targets and loss of a batch of 2 images against ``keypointrcnn_loss`` and its backward."""
  rng = np.random.default_rng(8)
  b, g, n, k, s = 2, 3, 10, 4, 8
  scenes = [_keypoint_scene(rng, g, k, n, s) for _ in range(b)]
  kp, rois, matched = (np.stack(v) for v in zip(*scenes))
  logits = (3 * rng.normal(size=(b, n, k, s, s))).astype(np.float32)

  def loss_fn(lg, kp, rois, matched):
    targets, valid = jax.vmap(lambda a, r, m: keypoint_targets(a, r, m, s))(kp, rois, matched)
    return keypoint_loss(lg, targets, valid)

  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(logits, kp, rois, matched)
  lt = torch.tensor(logits.reshape(b * n, k, s, s), requires_grad=True)
  want = keypointrcnn_loss(lt, [torch.from_numpy(r) for r in rois],
                           [torch.from_numpy(a) for a in kp],
                           [torch.from_numpy(m).long() for m in matched])
  want.backward()
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad).reshape(b * n, k, s, s), lt.grad.numpy(),
                             rtol=1e-5, atol=1e-8)


def test_keypoint_loss_single_image_garbage_in_invalid_slots():
  rng = np.random.default_rng(9)
  n, k, s = 6, 5, 7
  logits = (4 * rng.normal(size=(n, k, s, s))).astype(np.float32)
  valid = rng.uniform(size=(n, k)) < 0.5
  targets = rng.integers(0, s * s, (n, k)).astype(np.int32)
  targets[~valid] = rng.choice([-7, s * s, 10 ** 6], (~valid).sum())  # never read
  loss, grad = jax.jit(jax.value_and_grad(keypoint_loss))(logits, targets, valid)
  lt = torch.tensor(logits.reshape(n * k, s * s), requires_grad=True)
  want = F.cross_entropy(lt[torch.from_numpy(valid.reshape(-1))],
                         torch.from_numpy(targets[valid]).long())
  want.backward()
  np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad).reshape(n * k, s * s), lt.grad.numpy(),
                             rtol=1e-5, atol=1e-8)


def test_keypoint_loss_is_zero_with_zero_gradient_when_nothing_is_valid():
  rng = np.random.default_rng(10)
  logits = (50 * rng.normal(size=(2, 3, 4, 6, 6))).astype(np.float32)
  targets = np.full((2, 3, 4), -1, np.int32)
  valid = np.zeros((2, 3, 4), bool)
  loss, grad = jax.jit(jax.value_and_grad(keypoint_loss))(logits, targets, valid)
  assert float(loss) == 0.0
  assert np.all(np.isfinite(np.asarray(grad))) and not np.asarray(grad).any()
  lt = torch.tensor(logits.reshape(6, 4, 6, 6))
  no_kp = [torch.zeros((1, 4, 3))] * 2  # every keypoint unlabelled (v = 0)
  want = keypointrcnn_loss(lt, [torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)] * 2, no_kp,
                           [torch.zeros(3, dtype=torch.long)] * 2)
  assert want.item() == 0.0
