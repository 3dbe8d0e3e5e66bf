"""Keypoint outputs of the predictor (original pixels, scaled back as the boxes are), their COCO
records and their overlays (dots and skeletons on the right pixels; mask overlays unchanged).

The network is a stand-in (the model, kernel preparation and jit patched out) whose outputs sit
at known fractions of each image's valid region, so every number the predictor returns can be
checked against the image's own size; the model itself is tested in tests/modeling.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mrcnn_jax import config as config_lib
from mrcnn_jax import inference
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.inference import visualize
from mrcnn_jax.modeling.config import tiny_model_config

# Four detection slots: boxes and K = 3 keypoints as fractions (x of the valid width, y of the
# valid height); slot 0's first keypoint is its box's top-left corner.
BOXES = np.float32([[0.05, 0.05, 0.45, 0.45], [0.55, 0.10, 0.95, 0.50],
                    [0.10, 0.60, 0.50, 0.95], [0.60, 0.60, 0.90, 0.90]])
KEYPOINTS = np.float32([[[0.05, 0.05], [0.25, 0.25], [0.35, 0.30]],
                        [[0.65, 0.20], [0.75, 0.30], [0.85, 0.40]],
                        [[0.20, 0.70], [0.30, 0.80], [0.40, 0.90]],
                        [[0.70, 0.70], [0.75, 0.75], [0.80, 0.80]]])
KEYPOINT_SCORES = np.float32([[5, 5, -1], [5, 1, 5], [3, 4, 6], [5, 5, 5]])
SCORES = np.float32([0.9, 0.8, 0.6, 0.3])  # slot 3 is below the predictor's 0.5
CLASSES = np.int32([1, 2, 1, 1])
SIZES = [(48, 100), (80, 40), (64, 64), (30, 90)]
BASE_KEYS = {"boxes", "scores", "classes", "labels", "category_ids"}


class FakeNetwork:
  """``MaskRCNN.predict``'s outputs for a batch, in network-input pixels of each slot's valid
  region (float32, as the model gives them); full-box masks unless ``masks`` is False."""

  def __init__(self, masks: bool):
    self.masks = masks

  def __call__(self, variables, images, valid_size):
    del variables
    b = np.shape(images)[0]
    size = np.asarray(valid_size, np.float32)[:, None, ::-1]  # [B, 1, 2] (w, h)
    out = {"boxes": BOXES[None] * np.tile(size, (1, 1, 2)),
           "scores": np.tile(SCORES, (b, 1)), "classes": np.tile(CLASSES, (b, 1)),
           "valid": np.ones((b, 4), bool),
           "keypoints": KEYPOINTS[None] * size[:, :, None],
           "keypoint_scores": np.tile(KEYPOINT_SCORES, (b, 1, 1))}
    if self.masks:
      out["masks"] = np.full((b, 4, 28, 28), 0.9, np.float32)
    return out


@pytest.fixture
def make_predictor(monkeypatch):
  def make(masks: bool = True, batch_size: int = 1, draw_threshold=None,
           **kwargs) -> inference.Predictor:
    monkeypatch.setattr(modeling, "MaskRCNN", lambda *args, **kw: None)
    monkeypatch.setattr(kernels, "prepare_inference", lambda model, variables, size: variables)
    monkeypatch.setattr(kernels, "jit_predict", lambda model: FakeNetwork(masks))
    c = config_lib.get_base_config()
    c.data.image_size = (64, 64)
    c.model = tiny_model_config(num_classes=3)
    if draw_threshold is not None:
      c.eval.keypoint_draw_threshold = draw_threshold
    return inference.Predictor(c, {}, class_names=["person", "ball"], category_ids=[1, 5],
                               batch_size=batch_size, **kwargs)
  return make


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in SIZES]


def test_keypoints_come_back_in_original_pixels_as_the_boxes(make_predictor):
  """Each image of another size and aspect: the keypoints are the same fractions of the
  original image as of the network's valid region, scaled exactly as the boxes (a keypoint on
  a box corner stays on it bit for bit); the rows are the kept detections'."""
  predictor = make_predictor()
  for image, (h, w) in zip(_images(), SIZES):
    r = predictor(image)
    assert set(r) == BASE_KEYS | {"masks", "keypoints", "keypoint_scores"}
    assert r["keypoints"].shape == (3, 3, 2) and r["keypoints"].dtype == np.float32
    assert r["keypoint_scores"].dtype == np.float32
    np.testing.assert_array_equal(r["keypoint_scores"], KEYPOINT_SCORES[:3])
    np.testing.assert_allclose(r["keypoints"], KEYPOINTS[:3] * np.float32([w, h]),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r["boxes"], BOXES[:3] * np.float32([w, h, w, h]),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(r["keypoints"][0, 0], r["boxes"][0, :2])
    assert r["masks"].shape == (3, h, w)


def test_a_model_without_masks_and_batches(make_predictor):
  """No ``masks`` key from the network: none in the results, COCO records without
  ``segmentation``; predict_batch (batches of 3 for 4 images) gives each image's predict."""
  predictor = make_predictor(masks=False, batch_size=3)
  images = _images()
  results = predictor.predict_batch(images)
  assert len(results) == 4
  for image, r in zip(images, results):
    assert set(r) == BASE_KEYS | {"keypoints", "keypoint_scores"}
    alone = predictor.predict(image)
    for key in ("boxes", "keypoints", "keypoint_scores", "scores"):
      np.testing.assert_array_equal(r[key], alone[key])
    records = inference.to_coco_results(r, 7)
    assert all("segmentation" not in rec and len(rec["keypoints"]) == 9 for rec in records)


def test_coco_records_carry_keypoints_and_scores(make_predictor):
  predictor = make_predictor()
  r = predictor(_images()[0])
  records = inference.to_coco_results(r, 3, file_name="a.png")
  assert [rec["category_id"] for rec in records] == [1, 5, 1]
  for rec, kp, s in zip(records, r["keypoints"], r["keypoint_scores"]):
    assert rec["keypoints"] == [float(v) for v in np.concatenate([kp, s[:, None]], 1).ravel()]
    assert "segmentation" in rec and rec["file_name"] == "a.png"
  json.dumps(records)
  only_person = inference.to_coco_results(r, 3, keypoint_labels={"person"})
  assert ["keypoints" in rec for rec in only_person] == [True, False, True]


def test_predict_files_draws_keypoints_and_writes_them(make_predictor, tmp_path):
  """Overlays: each keypoint scoring above the threshold is a dot of its instance's colour on
  its pixel; one below it is not drawn; results.json records have the keypoints (only for the
  classes named in ``skeletons`` when given)."""
  predictor = make_predictor(skeletons={"person": [(1, 2), (2, 3)]})
  paths = []
  for i, image in enumerate(_images()[:2]):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  out = inference.predict_files(predictor, paths, str(tmp_path / "out"))
  colors = visualize.instance_colors(3)
  for path, png in zip(paths, out["overlays"]):
    image = np.asarray(Image.open(path))
    r = predictor(image)
    overlay = np.asarray(Image.open(png))
    without = visualize.draw_instances(image, r["boxes"], r["scores"], r["labels"], r["masks"])
    for i in range(3):
      for j in range(3):
        x, y = (int(np.floor(v)) for v in r["keypoints"][i, j])
        if KEYPOINT_SCORES[i, j] > visualize.KEYPOINT_THRESHOLD:
          np.testing.assert_array_equal(overlay[y, x], colors[i], err_msg=f"{path} {i} {j}")
        else:  # the overlay's pixel without keypoints (a mask, a label, ...)
          np.testing.assert_array_equal(overlay[y, x], without[y, x], err_msg=f"{path} {i} {j}")
    assert (overlay != without).any()
  with open(out["results"]) as f:
    detections = json.load(f)["detections"]
  assert [("keypoints" in d, d["category_id"]) for d in detections] == [
      (True, 1), (False, 5), (True, 1)] * 2


def test_the_draw_threshold_comes_from_the_config(make_predictor):
  """``config.eval.keypoint_draw_threshold`` (default 2) unless the predictor is given one: at
  0.5 the keypoint scoring 1 is drawn too, the one scoring -1 still not."""
  image = _images()[2]
  default = make_predictor()
  assert default.keypoint_threshold == visualize.KEYPOINT_THRESHOLD == 2.0
  low = make_predictor(draw_threshold=0.5)
  assert low.keypoint_threshold == 0.5
  assert make_predictor(draw_threshold=0.5, keypoint_threshold=3.0).keypoint_threshold == 3.0
  r = low(image)
  drawn = low.draw(image, r)
  np.testing.assert_array_equal(drawn, visualize.draw_instances(
      image, r["boxes"], r["scores"], r["labels"], r["masks"], keypoints=r["keypoints"],
      keypoint_scores=r["keypoint_scores"], keypoint_threshold=0.5))
  x, y = (int(v) for v in np.floor(r["keypoints"][1, 1]))  # scores 1
  np.testing.assert_array_equal(drawn[y, x], visualize.instance_colors(3)[1])
  assert not np.array_equal(default.draw(image, r)[y, x], drawn[y, x])


# ------------------------------------------------------------------------ overlays


def _scene():
  image = np.full((100, 120, 3), 40, np.uint8)
  boxes = np.float32([[10, 20, 80, 90]])
  keypoints = np.float32([[[20.7, 30.2], [60.5, 30.5], [60.5, 70.5], [20.5, 70.5]]])
  return image, boxes, keypoints


def test_keypoints_and_skeleton_on_their_pixels():
  """Dots on the pixel each keypoint lies in (the instance's colour, ringed in white); lines
  join a skeleton pair only where both keypoints are drawn; a keypoint at or below the
  threshold is not drawn."""
  image, boxes, keypoints = _scene()
  scores = np.float32([[5.0, 2.5, 3.0, 2.0]])  # the last one exactly at the threshold 2
  out = visualize.draw_instances(image, boxes, [0.9], ["person"], keypoints=keypoints,
                                 keypoint_scores=scores,
                                 skeletons={"person": [(1, 2), (2, 3), (3, 4), (4, 1)]})
  color = visualize.instance_colors(1)[0]
  for y, x in ((30, 20), (30, 60), (70, 60)):
    np.testing.assert_array_equal(out[y, x], color)
    ring = out[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3)
    assert (ring == 255).all(axis=1).any()  # the white ring
  np.testing.assert_array_equal(out[70, 20], image[70, 20])  # not drawn
  np.testing.assert_array_equal(out[30, 40], color)  # line 1-2
  np.testing.assert_array_equal(out[50, 60], color)  # line 2-3
  np.testing.assert_array_equal(out[70, 40], image[70, 40])  # 3-4: keypoint 4 is hidden
  np.testing.assert_array_equal(out[50, 20], image[50, 20])  # 4-1 likewise
  # Without a skeleton for the label (or none at all): the same dots, no lines.
  for skeletons in ({"other": [(1, 2)]}, None):
    dots = visualize.draw_instances(image, boxes, [0.9], ["person"], keypoints=keypoints,
                                    keypoint_scores=scores, skeletons=skeletons)
    np.testing.assert_array_equal(dots[30, 20], color)
    np.testing.assert_array_equal(dots[30, 40], image[30, 40])
  # A lower threshold draws the fourth; no scores draws every keypoint.
  low = visualize.draw_instances(image, boxes, [0.9], ["person"], keypoints=keypoints,
                                 keypoint_scores=scores, keypoint_threshold=1.0)
  every = visualize.draw_instances(image, boxes, [0.9], ["person"], keypoints=keypoints)
  np.testing.assert_array_equal(low, every)
  np.testing.assert_array_equal(every[70, 20], color)


def test_keypoint_arguments_leave_mask_overlays_unchanged():
  """A mask overlay is the same with keypoint arguments that draw nothing (all below the
  threshold), and the keypoints drawn on it change only pixels near them."""
  image = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
  masks = np.zeros((2, 60, 80), bool)
  masks[0, 30:50, 5:25] = True
  masks[1, 30:50, 50:75] = True
  boxes = np.float32([[5, 30, 25, 50], [50, 30, 75, 50]])
  plain = visualize.draw_instances(image, boxes, [0.9, 0.8], ["a", "b"], masks)
  keypoints = np.float32([[[10, 40], [20, 45]], [[60, 40], [70, 45]]])
  hidden = visualize.draw_instances(image, boxes, [0.9, 0.8], ["a", "b"], masks,
                                    keypoints=keypoints, keypoint_scores=np.zeros((2, 2)))
  np.testing.assert_array_equal(hidden, plain)
  drawn = visualize.draw_instances(image, boxes, [0.9, 0.8], ["a", "b"], masks,
                                   keypoints=keypoints)
  changed = np.argwhere((drawn != plain).any(axis=-1))
  near = np.abs(changed[:, None, :] - keypoints.reshape(-1, 2)[None, :, ::-1]).max(-1).min(-1)
  assert changed.size and near.max() <= 3


def test_a_suppressed_duplicate_draws_no_keypoints():
  image, boxes, keypoints = _scene()
  both = np.concatenate([boxes, boxes + 1])
  kps = np.concatenate([keypoints, keypoints + np.float32([0, 10])])  # the duplicate's: lower
  out = visualize.draw_instances(image, both, [0.9, 0.6], ["person", "person"], keypoints=kps)
  only = visualize.draw_instances(image, boxes, [0.9], ["person"], keypoints=keypoints)
  np.testing.assert_array_equal(out, only)


def test_keypoint_shapes_are_checked_and_skeletons_read_from_categories():
  image, boxes, keypoints = _scene()
  with pytest.raises(ValueError, match=r"keypoints must be \[N, K, 2\]"):
    visualize.draw_instances(image, boxes, [0.9], ["a"], keypoints=np.zeros((1, 4, 3)))
  with pytest.raises(ValueError, match=r"keypoint_scores must be \[N, K\]"):
    visualize.draw_instances(image, boxes, [0.9], ["a"], keypoints=keypoints,
                             keypoint_scores=np.zeros((1, 3)))
  categories = [{"id": 1, "name": "person", "keypoints": ["a", "b"], "skeleton": [[1, 2]]},
                {"id": 2, "name": "shape", "keypoints": ["a"]}, {"id": 3, "name": "ball"}]
  assert visualize.skeletons_from_categories(categories) == {"person": [(1, 2)], "shape": []}
