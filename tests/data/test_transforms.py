"""transform_example: static shapes, box/mask/pixel alignment under resize, flip and crop."""

import numpy as np
import pytest
import tensorflow as tf
import torch
from torchvision.ops import roi_align

from mrcnn_jax.data import transforms

H = W = 64
S = 14
G = 4


def _raw(rng, h=40, w=52, n=3):
  """An image with instance masks (ellipses + one border rectangle); instance 0 painted red."""
  yy, xx = np.mgrid[:h, :w]
  masks, boxes = [], []
  for i in range(n):
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(4, h / 3), rng.uniform(4, w / 3)
    m = (((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1).astype(np.uint8)
    if i == n - 1:  # one instance touches the image border
      m = ((xx < 9) & (yy > h // 2)).astype(np.uint8)
    ys, xs = np.nonzero(m)
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    masks.append(m)
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = masks[0] * 255  # instance 0 painted in the red channel only
  image[..., 1] = np.arange(w)[None, :] * 4  # a horizontal ramp reveals flips
  return {"image": image, "boxes": np.array(boxes, np.float32), "classes": np.arange(1, n + 1, dtype=np.int32),
          "masks": np.stack(masks), "image_id": np.int32(5), "ok": np.bool_(True)}


def _run(raw, seed=0, **kw):
  args = dict(image_size=(H, W), max_instances=G, mask_size=S, training=False)
  args.update(kw)
  out = transforms.transform_example({k: tf.constant(v) for k, v in raw.items()},
                                     tf.constant([seed, 1], tf.int64), **args)
  return {k: v.numpy() for k, v in out.items()}


def _paste(mask, box, h, w):
  """Nearest-neighbour paste of an SxS box mask into an [h, w] canvas (pixel centres)."""
  x1, y1, x2, y2 = box
  yy, xx = np.mgrid[:h, :w] + 0.5
  inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
  c = np.clip(((xx - x1) / (x2 - x1) * S).astype(int), 0, S - 1)
  r = np.clip(((yy - y1) / (y2 - y1) * S).astype(int), 0, S - 1)
  return inside & (mask[r, c] > 0)


def test_static_shapes_and_info(rng):
  raw = _raw(rng)
  out = _run(raw)
  for key, (shape, dtype) in transforms.output_signature((H, W), G, S).items():
    assert out[key].shape == shape and out[key].dtype == dtype.as_numpy_dtype, key
  scale = min(H / 40, W / 52)
  np.testing.assert_array_equal(out["original_size"], [40, 52])
  np.testing.assert_array_equal(out["valid_size"], [round(40 * scale), 52 * scale])
  np.testing.assert_allclose(out["image_scale"], [round(40 * scale) / 40, scale], rtol=1e-6)
  assert out["gt_valid"].tolist() == [True] * 3 + [False]
  np.testing.assert_array_equal(out["gt_classes"], [1, 2, 3, 0])
  assert not out["gt_boxes"][3].any() and not out["gt_masks"][3].any()
  assert not out["image"][out["valid_size"][0]:].any()  # zero padding at the bottom


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_match_roi_align_oracle(rng, seed):
  """Eval geometry: mask targets = torchvision roi_align(aligned) of the original mask."""
  raw = _raw(np.random.default_rng(seed), n=3)
  out = _run(raw)
  sy, sx = out["image_scale"]
  boxes_orig = out["gt_boxes"][:3] / np.array([sx, sy, sx, sy], np.float32)
  np.testing.assert_allclose(boxes_orig, raw["boxes"], atol=1e-3)
  rois = torch.cat([torch.zeros(3, 1), torch.from_numpy(boxes_orig)], dim=1)
  want = torch.stack([roi_align(torch.from_numpy(raw["masks"][i:i + 1]).float()[:, None],
                                rois[i:i + 1], (S, S), 1.0, 1, aligned=True)[0, 0]
                      for i in range(3)]).numpy() >= 0.5
  assert (out["gt_masks"][:3] == want).mean() > 0.995


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale_range", [(0.6, 1.0), (1.3, 2.0)])
def test_flip_resize_crop_keep_alignment(seed, scale_range):
  """The red instance's pixels, its box and its mask line up in the output (pixel check)."""
  raw = _raw(np.random.default_rng(100 + seed))
  out = _run(raw, seed=seed, training=True, scale_range=scale_range, random_flip=True)
  if 1 not in out["gt_classes"]:  # instance 0 left the crop, so no red pixel may remain
    assert (out["image"][..., 0] >= 128).sum() <= 2
    return
  assert out["gt_classes"][0] == 1
  red = out["image"][..., 0] >= 128
  box = out["gt_boxes"][0]
  pasted = _paste(out["gt_masks"][0], box, H, W)
  iou = (red & pasted).sum() / max((red | pasted).sum(), 1)
  assert iou > 0.8, iou
  ys, xs = np.nonzero(red)
  np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=1.6)


def test_flip_is_applied_consistently():
  flips = []
  for seed in range(8):
    raw = _raw(np.random.default_rng(7))
    out = _run(raw, seed=seed, training=True, random_flip=True)
    ramp = out["image"][2, :out["valid_size"][1], 1].astype(int)
    flipped = ramp[0] > ramp[-1]
    flips.append(flipped)
    x1 = out["gt_boxes"][0, 0]
    sx = out["image_scale"][1]
    want = (52 - raw["boxes"][0, 2]) * sx if flipped else raw["boxes"][0, 0] * sx
    np.testing.assert_allclose(x1, want, atol=1e-3)
  assert any(flips) and not all(flips)


def test_degenerate_dropped_and_truncation_counted(rng):
  raw = _raw(rng, n=3)
  extra = np.array([[10, 10, 10.4, 30], [1, 1, 30, 30], [2, 2, 20, 20], [3, 3, 9, 9]], np.float32)
  raw["boxes"] = np.concatenate([raw["boxes"], extra])
  raw["masks"] = np.concatenate([raw["masks"], np.ones((4, 40, 52), np.uint8)])
  raw["classes"] = np.arange(1, 8, dtype=np.int32)
  out = _run(raw)
  # 7 instances, #4 is 0.4*1.23 px wide -> dropped; 6 remain, G = 4 keep the first four.
  np.testing.assert_array_equal(out["gt_classes"], [1, 2, 3, 5])
  assert out[transforms.NUM_TRUNCATED_KEY] == 2
  assert out["gt_valid"].all()


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 480), (500, 1500), (800, 1333),
                                (37, 1000), (1024, 1024)])
def test_shorter_side_resize_matches_torchvision(hw):
  """min_size / max_size: the size torchvision's GeneralizedRCNNTransform resizes to (it floors
  h * scale and we round it, so the sides may differ by one pixel), padded to image_size."""
  from torchvision.models.detection.transform import GeneralizedRCNNTransform
  h, w = hw
  tv = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3)
  tv_h, tv_w = tv.resize(torch.zeros(3, h, w), None)[0].shape[1:]
  assert min(tv_h, tv_w) == 800 or max(tv_h, tv_w) >= 1332  # the rule under test
  raw = {"image": np.zeros((h, w, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
         "classes": np.zeros((0,), np.int32), "masks": np.zeros((0, h, w), np.uint8),
         "image_id": np.int32(0), "ok": np.bool_(True)}
  out = _run(raw, image_size=(1344, 1344), min_size=800, max_size=1333)
  vh, vw = out["valid_size"]
  assert abs(vh - tv_h) <= 1 and abs(vw - tv_w) <= 1, ((vh, vw), (tv_h, tv_w))
  assert out["image"].shape == (1344, 1344, 3)
  np.testing.assert_allclose(out["image_scale"], [vh / h, vw / w], rtol=1e-6)


def test_shorter_side_resize_with_jitter_spans_the_range(rng):
  """The 3x recipe: jitter (0.8, 1.0) on a shorter side of 800 draws it from 640..800, and, as
  Detectron2's multi-scale resize, the longer side stays capped at 1333, not at 0.8 x 1333."""
  kw = dict(image_size=(1344, 1344), min_size=800, max_size=1333, training=True,
            scale_range=(0.8, 1.0))
  shorter = [min(_run(_raw(rng, h=48, w=64), seed=s, **kw)["valid_size"]) for s in range(12)]
  assert 640 <= min(shorter) < max(shorter) <= 800, shorter
  # 1:3: the cap (1333 / 150) binds for every draw (800 * 0.8 / 50 is larger).
  wide = [tuple(_run(_raw(rng, h=50, w=150), seed=s, **kw)["valid_size"]) for s in range(6)]
  assert set(wide) == {(444, 1333)}, wide


@pytest.mark.parametrize("kw, match", [
    (dict(min_size=800, max_size=1333, image_size=(1024, 1344)), "must hold max_size"),
    (dict(min_size=800, max_size=0), "min_size <= max_size"),
    (dict(min_size=0, max_size=1333), "min_size <= max_size"),
    (dict(min_size=900, max_size=800), "min_size <= max_size"),
])
def test_bad_resize_settings_raise(rng, kw, match):
  with pytest.raises(ValueError, match=match):
    _run(_raw(rng), **kw)
