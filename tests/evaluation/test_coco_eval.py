"""COCO evaluation: detections to COCO records, AP judged by pycocotools (mask pasting vs
torchvision: tests/inference/test_masks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from mrcnn_jax.evaluation import coco_eval
from mrcnn_jax.inference import masks as masks_lib


def _toy_coco():
  """Two images, two categories (sparse ids 3 and 7), rectangles and a triangle."""
  images = [{"id": 10, "height": 60, "width": 80}, {"id": 11, "height": 50, "width": 50}]
  categories = [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]
  anns = []
  shapes = [
      (10, 3, [[5, 5, 30, 5, 30, 25, 5, 25]]),
      (10, 7, [[40, 10, 70, 10, 55, 50]]),
      (11, 3, [[10, 20, 40, 20, 40, 45, 10, 45]]),
  ]
  for i, (image_id, cat, poly) in enumerate(shapes):
    h = next(im["height"] for im in images if im["id"] == image_id)
    w = next(im["width"] for im in images if im["id"] == image_id)
    rle = mask_util.merge(mask_util.frPyObjects(poly, h, w))
    x, y, bw, bh = mask_util.toBbox(rle).tolist()
    anns.append({"id": i + 1, "image_id": image_id, "category_id": cat, "segmentation": poly,
                 "area": float(mask_util.area(rle)), "bbox": [x, y, bw, bh], "iscrowd": 0})
  coco = COCO()
  coco.dataset = {"images": images, "annotations": anns, "categories": categories}
  coco.createIndex()
  return coco


def _gt_as_results(coco, shuffle_rng=None):
  results = []
  anns = list(coco.anns.values())
  for ann in anns:
    img = coco.imgs[ann["image_id"]]
    rle = coco.annToRLE(ann)
    rle["counts"] = rle["counts"].decode("ascii")
    results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "bbox": list(ann["bbox"]), "score": 0.9, "segmentation": rle})
  if shuffle_rng is not None:  # move each prediction to another image's spot
    boxes = [r["bbox"] for r in results]
    order = shuffle_rng.permutation(len(results))
    while (order == np.arange(len(results))).any():
      order = shuffle_rng.permutation(len(results))
    for r, j in zip(results, order):
      r["bbox"] = boxes[j]
      r.pop("segmentation")
  return results


def test_ground_truth_scores_ap_one():
  coco = _toy_coco()
  metrics = coco_eval.evaluate_coco(coco, _gt_as_results(coco))
  for iou_type in ("bbox", "segm"):
    assert metrics[iou_type]["AP"] == pytest.approx(1.0)
    assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
    assert set(metrics[iou_type]["per_category"]) == {"square", "triangle"}
  assert "Average Precision" in metrics["bbox"]["summary"]


def test_shuffled_predictions_score_low():
  coco = _toy_coco()
  metrics = coco_eval.evaluate_coco(
      coco, _gt_as_results(coco, np.random.default_rng(0)), iou_types=("bbox",))
  assert metrics["bbox"]["AP"] < 0.3


def test_no_results_gives_zeros():
  metrics = coco_eval.evaluate_coco(_toy_coco(), [])
  assert metrics["segm"]["AP"] == 0.0 and metrics["bbox"]["AR100"] == 0.0


def test_mask_ap_size_ranges_use_mask_area():
  """APs/APm/APl of the segm pass are by each detection's mask area, as pycocotools gives for
  results without a ``bbox`` (detectron2 drops it for this reason): with a ``bbox`` present,
  loadRes takes the box's area. Here a false positive whose mask is small (a 60-pixel diagonal)
  but whose box is 60x60 (medium) outscores the one true, small detection: by mask area it
  counts in the small range (APs 0.5), by box area it would be ignored there (APs 1.0)."""
  h = w = 100
  gt = np.zeros((h, w), np.uint8)
  gt[10:30, 10:30] = 1  # 400 px: small
  rle = mask_util.encode(np.asfortranarray(gt))
  rle["counts"] = rle["counts"].decode("ascii")
  coco = COCO()
  coco.dataset = {"images": [{"id": 1, "height": h, "width": w}],
                  "categories": [{"id": 1, "name": "a"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                                   "area": 400.0, "bbox": [10, 10, 20, 20], "iscrowd": 0}]}
  coco.createIndex()
  diagonal = np.zeros((h, w), bool)
  diagonal[np.arange(35, 95), np.arange(35, 95)] = True
  results = [
      {"image_id": 1, "category_id": 1, "bbox": [35.0, 35.0, 60.0, 60.0], "score": 0.9,
       "segmentation": masks_lib.encode_mask(diagonal)},
      {"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 0.5,
       "segmentation": masks_lib.encode_mask(gt.astype(bool))},
  ]
  segm = coco_eval.evaluate_coco(coco, results, iou_types=("segm",))["segm"]
  assert segm["AP"] == pytest.approx(0.5)
  assert segm["APs"] == pytest.approx(0.5)
  assert segm["APm"] == -1.0  # no medium ground truth: pycocotools' "no value"
  # The box pass is unchanged: by box, the false positive is medium and ignored in APs.
  bbox = coco_eval.evaluate_coco(coco, results, iou_types=("bbox",))["bbox"]
  assert bbox["APs"] == pytest.approx(1.0) and bbox["AP"] == pytest.approx(0.5)


def test_detections_to_coco_maps_back_to_original_pixels():
  """Full-box masks of GT rectangles, predicted at (sy, sx) = (2, 1.5), score AP 1.0 at IoU 0.5
  (unequal scales: swapping the axes would fail)."""
  coco = _toy_coco()
  sy, sx = 2.0, 1.5
  boxes = np.zeros((2, 4, 4), np.float32)
  classes = np.zeros((2, 4), np.int32)
  valid = np.zeros((2, 4), bool)
  cat_to_class = {3: 1, 7: 2}
  for b, image_id in enumerate((10, 11)):
    for d, ann in enumerate(coco.imgToAnns[image_id]):
      x, y, w, h = ann["bbox"]
      boxes[b, d] = np.array([x, y, x + w, y + h]) * [sx, sy, sx, sy]
      classes[b, d] = cat_to_class[ann["category_id"]]
      valid[b, d] = True
  masks = np.ones((2, 4, 28, 28), np.float32)
  detections = {"boxes": boxes, "scores": np.full((2, 4), 0.8, np.float32),
                "classes": classes, "masks": masks, "valid": valid}
  batch = {"image_id": np.array([10, 11]), "original_size": np.array([[60, 80], [50, 50]]),
           "image_scale": np.tile(np.float32([sy, sx]), (2, 1)),
           "example_valid": np.array([True, True])}
  results = coco_eval.detections_to_coco(detections, batch, {1: 3, 2: 7})
  assert len(results) == 3
  np.testing.assert_allclose(results[0]["bbox"], coco.imgToAnns[10][0]["bbox"], atol=1e-4)
  metrics = coco_eval.evaluate_coco(coco, results)
  assert metrics["bbox"]["AP"] == pytest.approx(1.0)
  # A full-box mask is (nearly) the square itself, but only half of the triangle.
  assert metrics["segm"]["per_category"]["square"] > 0.9
  assert metrics["segm"]["per_category"]["triangle"] < 0.1
  # A padding example is skipped entirely.
  batch["example_valid"] = np.array([True, False])
  assert {r["image_id"] for r in coco_eval.detections_to_coco(detections, batch, {1: 3, 2: 7})} == {10}


def test_detections_to_coco_mask_aligned_pastes_at_the_float_box():
  """``mask_aligned`` (the model's ``mask.aligned``) pastes half-pixel exactly: a full mask at
  a box with integer corners becomes exactly the box's pixels; torchvision's paste grows it."""
  coco = _toy_coco()
  boxes = np.zeros((1, 2, 4), np.float32)
  boxes[0, 0] = [10, 12, 30, 40]
  detections = {"boxes": boxes, "scores": np.full((1, 2), 0.8, np.float32),
                "classes": np.ones((1, 2), np.int32), "masks": np.ones((1, 2, 28, 28), np.float32),
                "valid": np.array([[True, False]])}
  batch = {"image_id": np.array([10]), "original_size": np.array([[60, 80]]),
           "image_scale": np.ones((1, 2), np.float32)}
  box_pixels = np.zeros((60, 80), bool)
  box_pixels[12:40, 10:30] = True
  for aligned, exact in ((True, True), (False, False)):
    (record,) = coco_eval.detections_to_coco(detections, batch, {1: 3}, mask_aligned=aligned)
    pasted = mask_util.decode(record["segmentation"]).astype(bool)
    assert np.array_equal(pasted, box_pixels) == exact
    assert pasted[box_pixels].all()


def test_bad_shapes_raise():
  with pytest.raises(ValueError):
    masks_lib.paste_mask(np.zeros((28, 14)), np.zeros(4), (10, 10))
  with pytest.raises(ValueError):
    coco_eval.detections_to_coco({"boxes": np.zeros((4, 4)), "scores": 0, "classes": 0,
                                  "valid": 0}, {}, {})
