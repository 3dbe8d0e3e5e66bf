"""Keypoints in the data layer: the shapes generator's points, the COCO source's parsing and
checks, the transforms' geometry (scale, crop, flip with the left/right swap), the pipelines."""

import filecmp
import hashlib
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_jax import data
from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data import shapes
from mrcnn_jax.data import transforms
from mrcnn_jax.data.batching import transform_kwargs
from tests.data.conftest import decode_segmentation
from tests.data.conftest import small_config

NAMES = ("top", "right", "bottom", "left")
TOP, RIGHT, BOTTOM, LEFT = range(4)
SHAPES_FLIP = (0, 3, 2, 1)  # "left" <-> "right"
# The shapes generator's JSON (num_train=8, num_val=3, size=64, seed=5) before keypoints existed.
GOLDEN_SHA256 = {
    "train_annotations": "4e11a9b8e1fc8e9772a4d7590f8448b371f6f4b54150a3562ee2309d2c29485c",
    "eval_annotations": "967272779a0b62041c46d95a01cacd08351c88d7674641333e525562a2fd54e6"}
COCO_PERSON = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
               "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
               "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")


def _load(path):
  with open(path) as f:
    return json.load(f)


def _take(p, n):
  return list(itertools.islice(iter(p), n))


def _kp_config(paths, num_keypoints=4, **data_overrides):
  c = small_config(paths, **data_overrides)
  c.model.keypoint.enabled = True
  c.model.keypoint.num_keypoints = num_keypoints
  return c


# ----------------------------------------------------------------------------------------------
# The shapes generator


def test_extreme_points_and_the_tie_rule():
  # An axis-aligned square: every extreme ties; clockwise from the top-right corner.
  np.testing.assert_array_equal(shapes.extreme_points([10, 10, 20, 10, 20, 20, 10, 20]),
                                [[20, 10], [20, 20], [10, 20], [10, 10]])
  # The generator's own axis-aligned square (angle 0, vertices rounded to 0.01): the same rule.
  square = np.reshape(shapes._polygon("square", 30.0, 30.0, 10.0, 0.0)[0], (4, 2))
  got = shapes.extreme_points(square.reshape(-1))
  assert len({tuple(p) for p in got}) == 4
  np.testing.assert_array_equal(got[TOP], [square[:, 0].max(), square[:, 1].min()])
  np.testing.assert_array_equal(got[LEFT], [square[:, 0].min(), square[:, 1].min()])
  # A circle's extremes are its polygon's points at 0, 90, 180, 270 degrees.
  circle = shapes._polygon("circle", 30.0, 20.0, 8.0, 1.0)[0]
  np.testing.assert_array_equal(shapes.extreme_points(circle),
                                [[30, 12], [38, 20], [30, 28], [22, 20]])


def _check_shape(category_id, pts):
  """The four labelled points form the category's figure (the vertex-free check for RLE
  annotations): a square's 4 corners, a circle's 4 extreme points, a triangle's 3 corners."""
  distinct = np.unique(pts, axis=0)
  if category_id == 1:  # square: four equal sides, equal diagonals
    sides = np.linalg.norm(pts - np.roll(pts, -1, axis=0), axis=1)
    diagonals = [np.linalg.norm(pts[0] - pts[2]), np.linalg.norm(pts[1] - pts[3])]
    assert len(distinct) == 4 and np.ptp(sides) < 0.05 and abs(np.subtract(*diagonals)) < 0.05
  elif category_id == 3:  # circle: top/bottom on one vertical, left/right on one horizontal
    assert abs(pts[TOP, 0] - pts[BOTTOM, 0]) < 0.02 and abs(pts[LEFT, 1] - pts[RIGHT, 1]) < 0.02
    assert abs((pts[BOTTOM, 1] - pts[TOP, 1]) - (pts[RIGHT, 0] - pts[LEFT, 0])) < 0.05
  else:  # triangle: three corners, equal sides
    assert len(distinct) == 3
    sides = np.linalg.norm(distinct - np.roll(distinct, -1, axis=0), axis=1)
    assert np.ptp(sides) < 0.05


def test_generator_keypoints_are_the_extreme_vertices_and_v_follows_the_mask(keypoint_shapes_dir):
  _, paths = keypoint_shapes_dir
  seen = {"polygon": 0, "figure": set(), "v": set(), "crowd": 0}
  for split in ("train_annotations", "eval_annotations"):
    d = _load(paths[split])
    for c in d["categories"]:
      assert c["keypoints"] == list(NAMES) and c["skeleton"] == [[1, 2], [2, 3], [3, 4], [4, 1]]
    sizes = {i["id"]: (i["height"], i["width"]) for i in d["images"]}
    for a in d["annotations"]:
      kp = np.asarray(a["keypoints"], np.float64).reshape(4, 3)
      labelled = kp[:, 2] > 0
      assert a["num_keypoints"] == labelled.sum()
      if a["iscrowd"]:
        assert not kp.any()
        seen["crowd"] += 1
        continue
      h, w = sizes[a["image_id"]]
      assert not kp[~labelled].any()  # an unlabelled point is (0, 0, 0)
      xy = kp[labelled, :2]
      assert ((xy >= 0) & (xy < [w, h])).all()
      # v = 2 exactly where the point's pixel is in the visible mask (the segmentation).
      mask = decode_segmentation(a["segmentation"], h, w)
      px = np.floor(xy).astype(int)
      np.testing.assert_array_equal(kp[labelled, 2], np.where(mask[px[:, 1], px[:, 0]], 2, 1))
      seen["v"].update(kp[labelled, 2].tolist())
      if isinstance(a["segmentation"], list):  # a polygon (the shape is unoccluded)
        vertices = np.concatenate([np.reshape(p, (-1, 2)) for p in a["segmentation"]])
        extreme = [vertices[:, 1].min(), vertices[:, 0].max(), vertices[:, 1].max(),
                   vertices[:, 0].min()]
        axis = [1, 0, 1, 0]
        outside = (vertices < 0).any(1) | (vertices[:, 0] >= w) | (vertices[:, 1] >= h)
        for k in range(4):
          attains = vertices[:, axis[k]] == extreme[k]
          if labelled[k]:  # one of the vertices, and the extreme one of its name
            assert (vertices == kp[k, :2]).all(1).any() and kp[k, axis[k]] == extreme[k]
          else:  # not labelled: that extreme vertex lies off the image
            assert (attains & outside).any()
        seen["polygon"] += 1
      if labelled.all():
        _check_shape(a["category_id"], kp[:, :2])
        seen["figure"].add(a["category_id"])
  assert seen["polygon"] >= 5 and seen["figure"] == {1, 3, 7} and seen["v"] == {1.0, 2.0}
  assert seen["crowd"] >= 1


def test_keypoints_off_writes_todays_files_and_on_adds_only_the_keypoint_fields(tmp_path):
  off = shapes.generate(str(tmp_path / "off"), num_train=8, num_val=3, size=64, seed=5)
  on = shapes.generate(str(tmp_path / "on"), num_train=8, num_val=3, size=64, seed=5,
                       keypoints=True)
  for key, digest in GOLDEN_SHA256.items():
    with open(off[key], "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, key
  for key in ("train_images", "eval_images"):
    names = sorted(os.listdir(off[key]))
    match, mismatch, errors = filecmp.cmpfiles(off[key], on[key], names, shallow=False)
    assert match == names and not mismatch and not errors
  for key in ("train_annotations", "eval_annotations"):
    a, b = _load(off[key]), _load(on[key])
    assert any(x["num_keypoints"] for x in b["annotations"])
    for x in b["annotations"]:
      del x["keypoints"], x["num_keypoints"]
    for x in b["categories"]:
      del x["keypoints"], x["skeleton"]
    assert a == b


def test_cli_keypoints_flag(tmp_path):
  subprocess.run([sys.executable, "-m", "mrcnn_jax.data.shapes", "--out", str(tmp_path / "cli"),
                  "--num_train", "3", "--num_val", "1", "--size", "48", "--seed", "2",
                  "--keypoints"], check=True, capture_output=True)
  api = shapes.generate(str(tmp_path / "api"), 3, 1, 48, 2, keypoints=True)
  for key in ("train_annotations", "eval_annotations"):
    cli = os.path.join(tmp_path, "cli", os.path.relpath(api[key], tmp_path / "api"))
    assert filecmp.cmp(cli, api[key], shallow=False)
  assert "keypoints" in _load(api["train_annotations"])["categories"][0]


# ----------------------------------------------------------------------------------------------
# Flip pairs


def test_flip_permutation():
  # COCO person: Detectron2's / torchvision's flip map.
  assert transforms.keypoint_flip_permutation(COCO_PERSON) == (
      0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
  assert transforms.keypoint_flip_permutation(NAMES) == SHAPES_FLIP
  assert transforms.keypoint_flip_permutation(("a", "b", "c"), [("a", "c")]) == (2, 1, 0)
  assert transforms.keypoint_flip_permutation(("a", "b", "c"), [(0, 1)]) == (1, 0, 2)
  assert transforms.keypoint_flip_permutation(("a", "b")) == (0, 1)  # nothing to swap
  for pairs, match in [([("a", "x")], "not one of"), ([(0, 3)], "neither"),
                       ([("a", "b"), ("b", "c")], "one other"), ([("a", "a")], "one other"),
                       ([("a", "b", "c")], "pairs")]:
    with pytest.raises(ValueError, match=match):
      transforms.keypoint_flip_permutation(("a", "b", "c"), pairs)


def test_flip_pairs_from_the_config(keypoint_shapes_dir):
  _, paths = keypoint_shapes_dir
  c = _kp_config(paths)
  assert transform_kwargs(c, True, NAMES)["keypoint_flip"] == SHAPES_FLIP
  c.data.keypoint_flip_pairs = (("top", "bottom"),)
  assert transform_kwargs(c, True, NAMES)["keypoint_flip"] == (2, 1, 0, 3)
  c.model.keypoint.enabled = False
  assert transform_kwargs(c, True, NAMES) == transform_kwargs(c, True)  # no keypoint arguments
  assert "num_keypoints" not in transform_kwargs(c, True)


# ----------------------------------------------------------------------------------------------
# The transform against a numpy computation of the same geometry

CORNERS = ("left_top", "right_top", "right_bottom", "left_bottom")  # flip: 0 <-> 1, 2 <-> 3


def _corner_raw(rng, h=40, w=52, n=4):
  """Instances whose keypoints are their box corners (v = 2), instance 1 a sub-pixel sliver (the
  transform drops it), one v = 0 point with coordinates, one v = 1 point and one v = 2 point
  outside the image."""
  x1 = rng.uniform(0, w - 8, n)
  y1 = rng.uniform(0, h - 8, n)
  x2 = np.minimum(x1 + rng.uniform(4, 30, n), w)
  y2 = np.minimum(y1 + rng.uniform(4, 30, n), h)
  x2[1] = x1[1] + 0.3
  boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32)
  kp = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x2, y2], 1),
                 np.stack([x1, y2], 1)], 1)
  kp = np.concatenate([kp, np.full((n, 4, 1), 2.0)], 2).astype(np.float32)
  kp[2, 3, 2] = 0.0  # not labelled: leaves as (0, 0, 0) although it has coordinates
  kp[3, 0, 2] = 1.0
  kp[0, 1, :2] = [w + 3.0, y1[0]]  # labelled but off the image
  yy, xx = np.mgrid[:h, :w] + 0.5
  masks = np.stack([(xx >= b[0]) & (xx < b[2]) & (yy >= b[1]) & (yy < b[3]) for b in boxes])
  return {"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "boxes": boxes,
          "classes": np.arange(1, n + 1, dtype=np.int32), "masks": masks.astype(np.uint8),
          "image_id": np.int32(3), "ok": np.bool_(True), "keypoints": kp}


def _geometry(raw, seed, image_size, training, scale_range, random_flip):
  h, w = raw["image"].shape[:2]
  g = transforms._draw_geometry(tf.constant(float(h)), tf.constant(float(w)), seed, image_size,
                                training, scale_range, random_flip)
  return [np.asarray(v) for v in g]


def _reference(raw, geometry, perm, max_instances):
  """(boxes [G, 4], keypoints [G, K, 3], kept raw rows) in numpy: the documented geometry,
  written out."""
  flip, rh, rw, vh, vw, oy, ox = geometry
  h, w = (np.float32(v) for v in raw["image"].shape[:2])
  sx, sy = np.float32(rw) / w, np.float32(rh) / h
  ox, oy, vw, vh = np.float32(ox), np.float32(oy), np.float32(vw), np.float32(vh)
  b = raw["boxes"]
  x1, x2 = (w - b[:, 2], w - b[:, 0]) if flip else (b[:, 0], b[:, 2])
  boxes = np.stack([np.clip(x1 * sx - ox, 0, vw), np.clip(b[:, 1] * sy - oy, 0, vh),
                    np.clip(x2 * sx - ox, 0, vw), np.clip(b[:, 3] * sy - oy, 0, vh)], 1)
  kept = np.flatnonzero((boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1))
  kept = kept[:max_instances]
  kp = raw["keypoints"]
  x = ((w - kp[..., 0]) if flip else kp[..., 0]) * sx - ox
  y = kp[..., 1] * sy - oy
  inside = (kp[..., 2] > 0) & (x >= 0) & (x <= vw) & (y >= 0) & (y <= vh)
  points = np.where(inside[..., None], np.stack([x, y, kp[..., 2]], -1), 0).astype(np.float32)
  if flip:
    points = points[:, list(perm)]
  pad = max_instances - len(kept)
  return (np.pad(boxes[kept], [(0, pad), (0, 0)]),
          np.pad(points[kept], [(0, pad), (0, 0), (0, 0)]), kept)


def test_transform_matches_numpy_geometry_and_box_corners():
  perm = transforms.keypoint_flip_permutation(CORNERS)
  assert perm == (1, 0, 3, 2)
  g, size = 4, (64, 64)
  flips, crops, cropped_points = set(), 0, 0
  cases = [(s, True) for s in range(14)] + [(s, False) for s in range(2)]
  for seed, training in cases:
    raw = _corner_raw(np.random.default_rng(seed))
    tf_seed = tf.constant([seed, 9], tf.int64)
    kw = dict(image_size=size, max_instances=g, mask_size=8, training=training,
              scale_range=(0.6, 1.7), random_flip=True)
    out = transforms.transform_example({k: tf.constant(v) for k, v in raw.items()}, tf_seed,
                                       num_keypoints=4, keypoint_flip=perm, **kw)
    out = {k: v.numpy() for k, v in out.items()}
    geometry = _geometry(raw, tf_seed, size, training, kw["scale_range"], True)
    want_boxes, want_kp, kept = _reference(raw, geometry, perm, g)
    assert out["gt_keypoints"].shape == (g, 4, 3) and out["gt_keypoints"].dtype == np.float32
    np.testing.assert_allclose(out["gt_boxes"], want_boxes, atol=1e-4)
    np.testing.assert_allclose(out["gt_keypoints"][..., :2], want_kp[..., :2], atol=1e-4)
    np.testing.assert_array_equal(out["gt_keypoints"][..., 2], want_kp[..., 2])
    valid = out["gt_valid"]
    assert 1 not in kept and not out["gt_keypoints"][~valid].any()  # sliver gone, padding 0
    # Exactly on the transformed box's corners, by name, flipped or not: the flip moves the
    # right corners to the left and the swap renames them.
    box = out["gt_boxes"]
    corner_xy = np.stack([box[:, [0, 1]], box[:, [2, 1]], box[:, [2, 3]], box[:, [0, 3]]], 1)
    on = out["gt_keypoints"][..., 2] > 0
    np.testing.assert_array_equal(out["gt_keypoints"][..., :2][on], corner_xy[on])
    flip, _, _, _, _, oy, ox = geometry
    flips.add(bool(flip))
    crops += bool(ox or oy)
    # Labelled points on the image that the crop took away (instance 0's off-image one aside).
    labelled_in = raw["keypoints"][kept][..., 2] > 0
    labelled_in[kept == 0, 1] = False
    cropped_points += int(labelled_in.sum() - on[:len(kept)].sum())
    if not training:  # evaluation: a pure scale, no flip, no crop
      sy, sx = out["image_scale"]
      kp = raw["keypoints"][[0, 2, 3]]
      keep = (kp[..., 2] > 0) & (kp[..., 0] <= 52)
      np.testing.assert_allclose(out["gt_keypoints"][:3][keep][:, :2],
                                 kp[keep][:, :2] * [sx, sy], rtol=1e-6)
  assert flips == {False, True} and crops >= 3 and cropped_points >= 3


def test_transform_with_keypoints_off_is_unchanged():
  raw = _corner_raw(np.random.default_rng(5))
  seed = tf.constant([1, 2], tf.int64)
  kw = dict(image_size=(64, 64), max_instances=4, mask_size=8, training=True,
            scale_range=(0.6, 1.7), random_flip=True)
  with_kp = transforms.transform_example({k: tf.constant(v) for k, v in raw.items()}, seed,
                                         num_keypoints=4, keypoint_flip=(1, 0, 3, 2), **kw)
  del raw["keypoints"]
  without = transforms.transform_example({k: tf.constant(v) for k, v in raw.items()}, seed, **kw)
  assert set(with_kp) - set(without) == {"gt_keypoints"}
  assert list(without) == list(transforms.output_signature((64, 64), 4, 8))
  for k in without:
    np.testing.assert_array_equal(with_kp[k].numpy(), without[k].numpy(), err_msg=k)
  with pytest.raises(ValueError, match="permutation"):
    transforms.transform_example({k: tf.constant(v) for k, v in raw.items()}, seed,
                                 num_keypoints=4, keypoint_flip=(0, 1), **kw)


# ----------------------------------------------------------------------------------------------
# The pipelines


def test_train_pipeline_keypoints_follow_the_geometry(keypoint_shapes_dir):
  """Every row of the first batches against the numpy geometry of the same draw (the pipeline's
  stateless augmentation seed of global position g), and the extremes stay extremes."""
  _, paths = keypoint_shapes_dir
  c = _kp_config(paths, scale_range=(0.7, 1.5), random_flip=True)
  p = data.build_train_dataset(c)
  assert p.source.keypoint_names == NAMES
  index = {r.image_id: i for i, r in enumerate(p.source.records)}
  flips, labelled = set(), 0
  for j, b in enumerate(_take(p, 3)):
    assert b["gt_keypoints"].shape == (4, 8, 4, 3) and b["gt_keypoints"].dtype == np.float32
    for r in range(4):
      raw = p.source.load(index[int(b["image_id"][r])])
      seed = tf.constant([c.seed + 0x5EED, j * 4 + r], tf.int64)
      geometry = _geometry(raw, seed, (64, 64), True, (0.7, 1.5), True)
      want_boxes, want_kp, _ = _reference(raw, geometry, SHAPES_FLIP, 8)
      np.testing.assert_allclose(b["gt_boxes"][r], want_boxes, atol=1e-4)
      np.testing.assert_allclose(b["gt_keypoints"][r][..., :2], want_kp[..., :2], atol=1e-4)
      np.testing.assert_array_equal(b["gt_keypoints"][r][..., 2], want_kp[..., 2])
      kp = b["gt_keypoints"][r]
      both = (kp[:, LEFT, 2] > 0) & (kp[:, RIGHT, 2] > 0)
      assert (kp[both, LEFT, 0] <= kp[both, RIGHT, 0]).all()  # left stays left after a flip
      both = (kp[:, TOP, 2] > 0) & (kp[:, BOTTOM, 2] > 0)
      assert (kp[both, TOP, 1] <= kp[both, BOTTOM, 1]).all()
      assert not kp[~b["gt_valid"][r]].any()
      flips.add(bool(geometry[0]))
      labelled += int((kp[..., 2] > 0).sum())
  assert flips == {False, True} and labelled >= 20


def test_keypoints_change_nothing_else_and_resume_exactly(keypoint_shapes_dir):
  _, paths = keypoint_shapes_dir
  on = _kp_config(paths, scale_range=(0.7, 1.5))
  off = small_config(paths, scale_range=(0.7, 1.5))
  a = _take(data.build_train_dataset(on), 3)
  resumed = _take(data.build_train_dataset(on, start_step=1), 2)
  plain = _take(data.build_train_dataset(off), 3)
  today = {"image", "gt_boxes", "gt_classes", "gt_masks", "gt_valid", "image_id",
           "original_size", "image_scale", "valid_size", "example_valid"}
  for x, y in zip(a, plain):
    assert set(y) == today and set(x) == today | {"gt_keypoints"}
    for k in y:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  for x, y in zip(a[1:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  ev_on, ev_off = list(data.build_eval_dataset(on)), list(data.build_eval_dataset(off))
  assert len(ev_on) == len(ev_off) == 2  # 6 images in batches of 4: two padding slots
  for x, y in zip(ev_on, ev_off):
    assert set(x) - set(y) == {"gt_keypoints"}
    for k in y:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert not x["gt_keypoints"][~x["gt_valid"]].any()
  assert (ev_on[-1]["gt_keypoints"][~ev_on[-1]["example_valid"]] == 0).all()
  # Evaluation: a pure scale, so every labelled JSON point comes back exactly scaled.
  src = data.build_eval_dataset(on).source
  b = ev_on[0]
  for r in range(4):
    raw = src.load(r)
    sy, sx = b["image_scale"][r]
    n = len(raw["classes"])
    want = raw["keypoints"] * np.float32([sx, sy, 1])
    np.testing.assert_allclose(b["gt_keypoints"][r, :n], want * (raw["keypoints"][..., 2:] > 0),
                               rtol=1e-6)


def test_buckets_carry_keypoints(keypoint_shapes_dir):
  _, paths = keypoint_shapes_dir
  buckets = ((64, 96), (96, 64))
  c = _kp_config(paths, buckets=buckets, min_size=48, max_size=64, scale_range=(0.7, 1.0),
                 random_flip=True)
  specs = data.train_batch_specs(c, 4)
  assert all(s["gt_keypoints"] == ((4, 8, 4, 3), np.float32) for s in specs.values())
  for b in _take(data.build_train_dataset(c), 2):
    spec = specs[b["image"].shape[1:3]]
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == spec
    kp = b["gt_keypoints"]
    on = kp[..., 2] > 0
    assert on.any() and not kp[~on].any()
    limit = b["valid_size"][:, None, None, ::-1]
    assert ((kp[..., :2] >= 0) & (kp[..., :2] <= limit)).all(-1)[on].all()
  # An example's keypoints are the same in either bucket (only the padding differs).
  source = coco_lib.CocoSource(paths["train_annotations"], paths["train_images"], training=True,
                               num_keypoints=4)
  kwargs = transform_kwargs(c, training=True, keypoint_names=source.keypoint_names)
  raw = {k: tf.constant(v) for k, v in source.load(0).items()}
  for s in range(3):
    seed = tf.constant([7, s], tf.int64)
    got = [transforms.transform_example(raw, seed, **dict(kwargs, image_size=size, bucket=True))
           for size in buckets]
    np.testing.assert_array_equal(got[0]["gt_keypoints"], got[1]["gt_keypoints"])


# ----------------------------------------------------------------------------------------------
# Bad keypoints, wrong K, TFDS


def _with_keypoints(paths, tmp_path, value):
  """The keypoint set's val JSON with the first non-crowd annotation's keypoints set to
  ``value`` (``'absent'``: the field removed)."""
  d = _load(paths["eval_annotations"])
  ann = next(a for a in d["annotations"] if not a["iscrowd"] and a["num_keypoints"])
  if value == "absent":
    del ann["keypoints"]
  else:
    ann["keypoints"] = value
  path = str(tmp_path / "ann.json")
  with open(path, "w") as f:
    json.dump(d, f)
  return path, ann


BAD = {"wrong_length": [1.0, 2.0, 2] * 3, "not_finite": [float("nan"), 2.0, 2] + [0] * 9,
       "infinite": [float("inf"), 2.0, 2] + [0] * 9, "bad_visibility": [1.0, 2.0, 3] + [0] * 9,
       "fractional_visibility": [1.0, 2.0, 1.5] + [0] * 9, "boolean": [True] * 12,
       "not_a_list": "1 2 2"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_keypoints_are_counted_skips_or_raise(keypoint_shapes_dir, tmp_path, case):
  _, paths = keypoint_shapes_dir
  path, ann = _with_keypoints(paths, tmp_path, BAD[case])
  images = paths["eval_images"]
  ev = coco_lib.CocoSource(path, images, training=False, num_keypoints=4)
  assert ev.refused_annotations["bad_keypoints"] == 1 and ev.stats.as_dict()["bad_keypoints"] == 1
  rec = next(r for r in ev.records if r.image_id == ann["image_id"])  # evaluation keeps the image
  assert ann["id"] not in [a["id"] for a in ev.ground_truth()["annotations"]]
  full = coco_lib.CocoSource(paths["eval_annotations"], images, training=False, num_keypoints=4)
  assert len(rec.classes) == len(next(r for r in full.records if r.image_id == rec.image_id)
                                 .classes) - 1
  tr = coco_lib.CocoSource(path, images, training=True, num_keypoints=4)
  assert ann["image_id"] not in [r.image_id for r in tr.records]  # training drops the image
  with pytest.raises(coco_lib.BadExampleError,
                     match=f"annotation {ann['id']} of image {ann['image_id']}: keypoint"):
    coco_lib.CocoSource(path, images, training=True, num_keypoints=4, on_bad_example="raise")
  # With keypoints off they are not read, so not refused.
  assert not coco_lib.CocoSource(path, images, training=False).refused_annotations


def test_absent_keypoints_are_zeros(keypoint_shapes_dir, tmp_path):
  _, paths = keypoint_shapes_dir
  path, ann = _with_keypoints(paths, tmp_path, "absent")
  src = coco_lib.CocoSource(path, paths["eval_images"], training=False, num_keypoints=4,
                            on_bad_example="raise")
  i = next(i for i, r in enumerate(src.records) if r.image_id == ann["image_id"])
  ex = src.load(i)
  full = coco_lib.CocoSource(paths["eval_annotations"], paths["eval_images"], training=False,
                             num_keypoints=4).load(i)
  changed = [n for n in range(len(ex["classes"]))
             if not np.array_equal(ex["keypoints"][n], full["keypoints"][n])]
  assert len(changed) == 1 and not ex["keypoints"][changed[0]].any()
  assert ex["keypoints"].shape == (len(ex["classes"]), 4, 3) and ex["keypoints"].dtype == np.float32
  assert coco_lib.placeholder_example(4)["keypoints"].shape == (0, 4, 3)


def test_wrong_number_of_keypoints_fails_at_start_up(keypoint_shapes_dir, shapes_dir, tmp_path):
  _, paths = keypoint_shapes_dir
  with pytest.raises(ValueError, match=r"instances_train\.json: the categories name 4 keypoints "
                     r".*num_keypoints = 17"):
    data.build_train_dataset(_kp_config(paths, num_keypoints=17))
  with pytest.raises(ValueError, match=r"instances_val\.json: .*num_keypoints = 3"):
    data.build_eval_dataset(_kp_config(paths, num_keypoints=3))
  # A JSON without keypoint names (the plain shapes set).
  _, plain = shapes_dir
  with pytest.raises(ValueError, match=r"instances_train\.json: keypoints are on .* no category"):
    data.build_train_dataset(_kp_config(plain))
  # Categories that disagree.
  d = _load(paths["eval_annotations"])
  d["categories"][1]["keypoints"] = ["a", "b", "c", "d"]
  bad = tmp_path / "disagree.json"
  bad.write_text(json.dumps(d))
  with pytest.raises(ValueError, match="disagree.json: the categories list different keypoint"):
    coco_lib.CocoSource(str(bad), paths["eval_images"], training=False, num_keypoints=4)
  # A prebuilt source that does not read the keypoints the config wants.
  source = coco_lib.CocoSource(paths["train_annotations"], paths["train_images"], training=True)
  with pytest.raises(ValueError, match="wants 4 keypoints .* source reads 0"):
    data.build_train_dataset(_kp_config(paths), source=source)


def test_tfds_refuses_keypoints(keypoint_shapes_dir, tmp_path):
  _, paths = keypoint_shapes_dir
  c = _kp_config(paths, source="tfds", tfds_data_dir=str(tmp_path))
  for build in (data.build_train_dataset, data.build_eval_dataset):
    with pytest.raises(ValueError, match="keypoint.enabled .* TFDS source"):
      build(c)
  assert not os.listdir(tmp_path)  # refused before TFDS looked for anything

