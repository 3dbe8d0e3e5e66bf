"""Tests for mrcnn_jax.ops.masks against torchvision's roi_align / paste_masks_in_image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops import roi_align

from mrcnn_jax.ops.masks import mask_targets, paste_masks

_H, _W = 64, 80  # image size of the mask-target tests


def _exact_scene(rng, g, s):
  """Full-image binary masks inside ``s x s`` integer boxes, and their exact crops.

  Boxes stay at least one pixel inside the image, where torchvision's clamp to the edge pixel
  and the crop's zero border agree.
  """
  full = np.zeros((g, _H, _W), np.float32)
  crops = (rng.random((g, s, s)) < 0.5).astype(np.float32)
  boxes = []
  for i in range(g):
    x0, y0 = int(rng.integers(1, _W - s)), int(rng.integers(1, _H - s))
    full[i, y0:y0 + s, x0:x0 + s] = crops[i]
    boxes.append([x0, y0, x0 + s, y0 + s])
  return full, crops, np.asarray(boxes, np.float32)


def _random_rois(rng, r, lo=0.5, hi=60.0):
  xy = rng.uniform(-8.0, 70.0, (r, 2))
  wh = rng.uniform(lo, hi, (r, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _tv_targets(full, rois, idx, size, sampling_ratio, aligned=False):
  """torchvision's roi_align of the matched full-image masks on mask_targets' grid.

  That grid has ``n = clip(ceil(side / size), 1, sampling_ratio)`` samples per bin on each
  axis. torchvision's roi_align takes one count for both axes, so each RoI is pooled with one
  sample per bin at ``(n_y size) x (n_x size)`` bins (the same sample points) and each
  ``n_y x n_x`` block of bins averaged. 0 where unmatched.
  """
  out = []
  for roi, i in zip(rois, np.maximum(idx, 0)):
    side = roi[2:] - roi[:2]
    if not aligned:
      side = np.maximum(side, np.float32(1.0))  # aligned=False: >= 1 pixel
    n_x, n_y = np.clip(np.ceil(side / np.float32(size)), 1, sampling_ratio).astype(int)
    fine = roi_align(torch.from_numpy(full[i:i + 1])[:, None], [torch.from_numpy(roi[None])],
                     (size * n_y, size * n_x), 1.0, 1, aligned)[0, 0].numpy()
    out.append(fine.reshape(size, n_y, size, n_x).mean(axis=(1, 3)))
  return np.where((idx >= 0)[:, None, None], np.stack(out), 0.0)


_targets_jit = jax.jit(mask_targets, static_argnames=("size", "sampling_ratio", "aligned"))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_targets_exact_crop_matches_roi_align(seed, aligned):
  rng = np.random.default_rng(seed)
  g, s, r = 4, 20, 48
  full, crops, gt_boxes = _exact_scene(rng, g, s)
  rois = _random_rois(rng, r)
  # RoIs close to the GT boxes as well as anywhere, and unmatched ones.
  rois[:g] = gt_boxes + rng.uniform(-3, 3, (g, 4)).astype(np.float32)
  idx = rng.integers(-1, g, r).astype(np.int32)
  idx[:g] = np.arange(g)
  for size, sr in ((28, 2), (14, 3), (7, 1)):
    out = _targets_jit(crops, gt_boxes, rois, idx, size=size, sampling_ratio=sr, aligned=aligned)
    assert out.shape == (r, size, size) and out.dtype == jnp.float32
    ref = _tv_targets(full, rois, idx, size, sr, aligned=aligned)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # The two conventions differ by half a pixel: the comparison tells them apart.
    other = _tv_targets(full, rois, idx, size, sr, aligned=not aligned)
    assert np.abs(ref - other).max() > 0.1


@pytest.mark.parametrize("lo,hi", [(0.5, 4.0), (4.0, 28.0), (28.5, 55.5), (0.5, 55.5)])
def test_mask_targets_equals_torchvision_project_masks_up_to_56(lo, hi):
  # torchvision's own target function samples adaptively, ceil(max(side, 1) / 28) points per
  # bin and axis: 1 for sides <= 28, 2 in (28, 56], the same as mask_targets at
  # sampling_ratio=2. (Longer sides get 2 here, >= 3 there: see _tv_targets.)
  rng = np.random.default_rng(3)
  g, s, r = 3, 24, 32
  full, crops, gt_boxes = _exact_scene(rng, g, s)
  rois = _random_rois(rng, r, lo=lo, hi=hi)
  idx = rng.integers(0, g, r).astype(np.int32)
  ref = project_masks_on_boxes(torch.from_numpy(full), torch.from_numpy(rois),
                               torch.from_numpy(idx.astype(np.int64)), 28).numpy()
  np.testing.assert_allclose(_targets_jit(crops, gt_boxes, rois, idx), ref, atol=1e-5)


@pytest.mark.parametrize("s", [37, 150])
def test_mask_targets_linear_ramp_any_resolution(s):
  # Bilinear sampling reproduces a linear function exactly, so for a ramp "mask" the crop at
  # any S, read back inside the box, must equal roi_align of the full image: this pins the
  # crop frame's scale and half-pixel offset for S != box size and non-integer boxes.
  yy, xx = np.mgrid[0:_H, 0:_W].astype(np.float32)
  full = (0.2 + 0.008 * xx + 0.005 * yy)[None]
  gt_box = np.array([[4.3, 3.7, 74.9, 60.2]], np.float32)
  gx1, gy1, gx2, gy2 = gt_box[0]
  centres = np.arange(s, dtype=np.float32) + 0.5
  cx = gx1 + centres * (gx2 - gx1) / s - 0.5  # crop pixel centres, roi_align's frame
  cy = gy1 + centres * (gy2 - gy1) / s - 0.5
  crop = (0.2 + 0.008 * cx[None, :] + 0.005 * cy[:, None])[None].astype(np.float32)
  rng = np.random.default_rng(6)
  xy = rng.uniform(8, 40, (16, 2))
  rois = np.concatenate([xy, xy + rng.uniform(1, 18, (16, 2))], 1).astype(np.float32)
  idx = np.zeros(16, np.int32)
  out = _targets_jit(crop, gt_box, rois, idx, size=14, sampling_ratio=2)
  np.testing.assert_allclose(out, _tv_targets(full, rois, idx, 14, 2), atol=2e-6)


def test_mask_targets_hand_computed():
  # One 2x2 GT mask, pixel-exact at box [2, 2, 4, 4] with only its top-left pixel set.
  crops = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
  gt_boxes = np.array([[2, 2, 4, 4]], np.float32)
  # RoI = GT box, 2x2 bins, one sample per bin at x = 2.5, 3.5 -> crop frame u = 0.5, 1.5:
  # pixel 0 has weight 0.5 at u = 0.5 and 0 at u = 1.5 on each axis.
  # The second RoI is shifted by -1/2 px: samples at u = 0, 1 hit pixel 0 exactly once.
  rois = np.array([[2, 2, 4, 4], [1.5, 1.5, 3.5, 3.5], [2, 2, 4, 4]], np.float32)
  idx = np.array([0, 0, -1], np.int32)
  out = np.asarray(mask_targets(crops, gt_boxes, rois, idx, size=2, sampling_ratio=1))
  np.testing.assert_allclose(out[0], [[0.25, 0.0], [0.0, 0.0]], atol=1e-7)
  np.testing.assert_allclose(out[1], [[1.0, 0.0], [0.0, 0.0]], atol=1e-7)
  np.testing.assert_array_equal(out[2], 0.0)


def _polygon_scene(rng, g):
  """Random star polygons rasterised by pycocotools; GT boxes are the tight pixel boxes."""
  full = np.zeros((g, _H, _W), np.float32)
  boxes = []
  for i in range(g):
    cx, cy = rng.uniform(20, _W - 20), rng.uniform(20, _H - 20)
    ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
    rad = rng.uniform(5, 17, 9)
    poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).ravel().tolist()
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], _H, _W)))
    full[i] = m
    ys, xs = np.nonzero(m)
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  return full, np.asarray(boxes, np.float32)


def test_mask_targets_random_polygons_cropped_at_112():
  rng = np.random.default_rng(4)
  g, s, r = 4, 112, 40
  full, gt_boxes = _polygon_scene(rng, g)
  # The data pipeline's crop: the mask at the centres of an S x S grid over the box (in
  # roi_align's aligned=True frame, pixel k centred at k + 0.5), binarised.
  batch_boxes = np.concatenate([np.arange(g)[:, None], gt_boxes], 1).astype(np.float32)
  crops = roi_align(torch.from_numpy(full)[:, None], torch.from_numpy(batch_boxes),
                    (s, s), 1.0, 1, True)[:, 0].numpy()
  crops = (crops >= 0.5).astype(np.float32)
  idx = rng.integers(0, g, r).astype(np.int32)
  rois = gt_boxes[idx] + rng.uniform(-6, 6, (r, 4)).astype(np.float32)
  out = np.asarray(_targets_jit(crops, gt_boxes, rois, idx))
  ref = _tv_targets(full, rois, idx, 28, 2)
  # Up-sampling loses the sub-pixel staircase of the raster: small, edge-only differences.
  assert np.abs(out - ref).mean() < 0.03
  inter = np.logical_and(out >= 0.5, ref >= 0.5).sum()
  union = np.logical_or(out >= 0.5, ref >= 0.5).sum()
  assert inter / union > 0.93


def test_mask_targets_vmap_and_unmatched():
  rng = np.random.default_rng(5)
  g, s, r = 3, 16, 10
  scenes = [_exact_scene(rng, g, s) for _ in range(2)]
  crops = np.stack([c for _, c, _ in scenes])
  gt_boxes = np.stack([b for _, _, b in scenes])
  rois = np.stack([_random_rois(rng, r) for _ in range(2)])
  idx = rng.integers(-1, g, (2, r)).astype(np.int32)
  idx[1] = -1
  out = jax.jit(jax.vmap(lambda *a: mask_targets(*a, size=14)))(crops, gt_boxes, rois, idx)
  np.testing.assert_allclose(out[0], _tv_targets(scenes[0][0], rois[0], idx[0], 14, 2),
                             atol=1e-5)
  np.testing.assert_array_equal(out[1], 0.0)
  # No GT at all: every target is zero.
  empty = mask_targets(np.zeros((0, s, s)), np.zeros((0, 4)), rois[0], idx[0], size=14)
  assert empty.shape == (r, 14, 14) and not np.any(np.asarray(empty))


def _paste_boxes(rng, n, h, w):
  """Boxes of every kind that still meet the image (see test_paste_masks_outside_image)."""
  xy = rng.uniform(-0.3, 0.9, (n, 2)) * [w, h]
  wh = rng.uniform(0.35, 0.8, (n, 2)) * [w, h]  # partly outside where xy < 0
  boxes = np.concatenate([xy, xy + wh], 1)
  boxes[: n // 8, :2] = rng.uniform(0, 0.9, (n // 8, 2)) * [w, h]  # tiny
  boxes[: n // 8, 2:] = boxes[: n // 8, :2] + rng.uniform(0, 1.5, (n // 8, 2))
  boxes[n // 8: n // 4] = [-0.4 * w, -0.3 * h, 1.3 * w, 1.2 * h]  # larger than the image
  boxes[n // 8: n // 4] += rng.uniform(-3, 3, (n // 4 - n // 8, 4))
  return boxes.astype(np.float32)


@pytest.mark.parametrize("seed,m,h,w", [(0, 28, 50, 70), (1, 28, 37, 23), (2, 14, 64, 64)])
def test_paste_masks_matches_torchvision(seed, m, h, w):
  rng = np.random.default_rng(seed)
  n = 24
  masks = rng.random((n, m, m)).astype(np.float32)
  boxes = _paste_boxes(rng, n, h, w)
  ref = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                             (h, w))[:, 0].numpy()
  out = jax.jit(paste_masks, static_argnums=2)(masks, boxes, (h, w))
  assert out.shape == (n, h, w) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  assert np.count_nonzero(ref) > 0.05 * ref.size  # the comparison is not vacuous


def _grid_sample_paste(masks, boxes, h, w):
  """Detectron2's paste written with torch's grid_sample: each pixel centre, normalised to the
  float box as ``(x + 0.5 - x1) / (x2 - x1) * 2 - 1``, sampled with align_corners=False."""
  m = torch.from_numpy(masks)[:, None]
  b = torch.from_numpy(boxes)
  gx = (torch.arange(w) + 0.5 - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1  # [N, w]
  gy = (torch.arange(h) + 0.5 - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1  # [N, h]
  grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], -1)
  return torch.nn.functional.grid_sample(m, grid, align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize("seed,m,h,w", [(0, 28, 50, 70), (1, 14, 37, 23)])
def test_paste_masks_aligned_matches_grid_sample(seed, m, h, w):
  rng = np.random.default_rng(seed)
  n = 24
  masks = rng.random((n, m, m)).astype(np.float32)
  boxes = _paste_boxes(rng, n, h, w)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.05)  # grid_sample divides by the size
  ref = _grid_sample_paste(masks, boxes, h, w)
  paste = jax.jit(paste_masks, static_argnums=2, static_argnames="aligned")
  out = paste(masks, boxes, (h, w), aligned=True)
  assert out.shape == (n, h, w) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  assert np.count_nonzero(ref) > 0.05 * ref.size
  assert np.abs(ref - paste(masks, boxes, (h, w))).max() > 0.1  # not torchvision's paste
  # An empty box pastes nothing (grid_sample would divide by zero).
  empty = paste(masks[:2], np.array([[5, 5, 5, 20], [3, 9, 30, 9]], np.float32), (h, w),
                aligned=True)
  np.testing.assert_array_equal(empty, 0.0)


def _shape_mask(kind, cx, cy, r, angle, h, w):
  t = angle + {"circle": np.linspace(0, 2 * np.pi, 32, endpoint=False),
               "square": np.array([0.25, 0.75, 1.25, 1.75]) * np.pi,
               "triangle": np.array([0.0, 2 / 3, 4 / 3]) * np.pi}[kind]
  poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).reshape(-1).tolist()
  return mask_utils.decode(mask_utils.frPyObjects([poly], h, w)).astype(np.float32)[..., 0]


def test_aligned_pair_returns_a_perfect_mask_at_its_box():
  # A GT mask made into its own 28x28 target at its exact box and pasted back: the aligned
  # pair returns it; torchvision's pair shifts and grows it by up to a pixel, which caps the
  # mask IoU of small objects (why the shapes demo trains with mask.aligned).
  rng = np.random.default_rng(0)
  s = 96
  ious = {False: [], True: []}
  for k in range(30):
    r = rng.uniform(12, 30)
    full = _shape_mask(("circle", "square", "triangle")[k % 3], *rng.uniform(r, s - r, 2), r,
                       rng.uniform(0, np.pi), s, s)
    ys, xs = np.nonzero(full)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    for aligned in (False, True):
      t = _targets_jit(full[None], np.array([[0, 0, s, s]], np.float32), box,
                       np.zeros(1, np.int32), sampling_ratio=4, aligned=aligned)
      back = np.asarray(paste_masks(t, box, (s, s), aligned=aligned))[0] >= 0.5
      ious[aligned].append((back & (full > 0)).sum() / (back | (full > 0)).sum())
  assert np.min(ious[True]) > 0.98, np.min(ious[True])
  assert np.mean(ious[False]) < 0.95, np.mean(ious[False])


def test_paste_masks_outside_image_and_vmap():
  # torchvision raises (negative slice ends) for boxes that miss the image entirely; the
  # pasted mask of such a box is, by definition, empty.
  masks = np.ones((3, 28, 28), np.float32)
  boxes = np.array([[-40, 5, -10, 20], [5, 90, 20, 130], [10, 10, 30, 30]], np.float32)
  out = np.asarray(paste_masks(masks, boxes, (40, 50)))
  np.testing.assert_array_equal(out[:2], 0.0)
  ref = paste_masks_in_image(torch.from_numpy(masks[2:])[:, None], torch.from_numpy(boxes[2:]),
                             (40, 50))[:, 0].numpy()
  np.testing.assert_allclose(out[2:], ref, atol=1e-6)
  batched = jax.vmap(lambda mk, bx: paste_masks(mk, bx, (40, 50)))(
      np.stack([masks, masks[::-1]]), np.stack([boxes, boxes[::-1]]))
  np.testing.assert_allclose(batched[0], out, atol=1e-6)
  np.testing.assert_allclose(batched[1], out[::-1], atol=1e-6)


def test_rank_errors():
  with pytest.raises(ValueError):
    mask_targets(np.zeros((2, 8)), np.zeros((2, 4)), np.zeros((3, 4)), np.zeros(3, np.int32))
  with pytest.raises(ValueError):
    mask_targets(np.zeros((2, 8, 8)), np.zeros((2, 4)), np.zeros((3, 4)), np.zeros(4, np.int32))
  with pytest.raises(ValueError):
    mask_targets(np.zeros((2, 8, 8)), np.zeros((2, 5)), np.zeros((3, 4)), np.zeros(3, np.int32))
  with pytest.raises(ValueError):
    paste_masks(np.zeros((2, 8, 8)), np.zeros((2, 4, 1)), (10, 10))
  with pytest.raises(ValueError):
    paste_masks(np.zeros((2, 8, 7)), np.zeros((2, 4)), (10, 10))
  with pytest.raises(ValueError):
    paste_masks(np.zeros((8, 8)), np.zeros((2, 4)), (10, 10))
