"""COCO keypoint AP (OKS): results in the COCO format, numbers equal to pycocotools' own run,
per-category sigmas, the errors of a wrong configuration, and the evaluator over a real eval
pipeline of the synthetic shapes set with keypoints."""

from __future__ import annotations

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pycocotools.cocoeval import Params

from mrcnn_jax import config as config_lib
from mrcnn_jax import data as data_lib
from mrcnn_jax.evaluation import coco_eval
from mrcnn_jax.evaluation import evaluator as evaluator_lib
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.run import sharding

PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
PERSON_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
                   [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5],
                   [4, 6], [5, 7]]


def _coco(dataset: dict) -> COCO:
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _instances(rng, image, cat_id, k, first_id, count):
  """``count`` annotations of category ``cat_id`` with ``k`` keypoints in ``image``: boxes of
  medium and large areas, visibility 0 / 1 / 2 at random (0: x = y = 0, as COCO stores it)."""
  anns = []
  for i in range(count):
    bw = rng.uniform(35, min(140, image["width"] - 5))
    bh = rng.uniform(35, min(140, image["height"] - 5))
    x0, y0 = rng.uniform(0, image["width"] - bw), rng.uniform(0, image["height"] - bh)
    v = rng.choice([0, 1, 2], size=k, p=[0.15, 0.15, 0.7])
    xy = np.stack([x0 + rng.uniform(0, bw, k), y0 + rng.uniform(0, bh, k)], 1) * (v > 0)[:, None]
    kp = np.concatenate([np.round(xy, 2), v[:, None]], 1).reshape(-1)
    anns.append({"id": first_id + i, "image_id": image["id"], "category_id": cat_id,
                 "bbox": [x0, y0, bw, bh], "area": 0.9 * bw * bh, "iscrowd": 0,
                 "keypoints": [float(t) if j % 3 < 2 else int(t) for j, t in enumerate(kp)],
                 "num_keypoints": int(np.count_nonzero(v))})
  return anns


def _keypoint_coco(seed: int = 0, shape_category: bool = False) -> COCO:
  """A person_keypoints-style ground truth: 4 images, persons (17 keypoints), a crowd region
  and, with ``shape_category``, a second category "shape" with 4 keypoints of its own."""
  rng = np.random.default_rng(seed)
  images = [{"id": 20 + i, "height": 150 + 10 * i, "width": 200 - 10 * i} for i in range(4)]
  categories = [{"id": 1, "name": "person", "supercategory": "person",
                 "keypoints": list(PERSON_KEYPOINTS), "skeleton": PERSON_SKELETON}]
  if shape_category:
    categories.append({"id": 4, "name": "shape", "keypoints": ["top", "right", "bottom", "left"],
                       "skeleton": [[1, 2], [2, 3], [3, 4], [4, 1]]})
  anns = []
  for image in images:
    anns += _instances(rng, image, 1, 17, 100 * image["id"], 3)
    if shape_category:
      anns += _instances(rng, image, 4, 4, 100 * image["id"] + 50, 2)
  anns.append({"id": 1, "image_id": 20, "category_id": 1, "bbox": [0, 0, 60, 60],
               "area": 2000.0, "iscrowd": 1, "keypoints": [0] * 51, "num_keypoints": 0})
  return _coco({"images": images, "annotations": anns, "categories": categories})


def _gt_results(coco: COCO, rng=None) -> list:
  """Ground truth with keypoints as results (x, y, score 1), each with its ``bbox``; with
  ``rng``, perturbed: keypoints moved by up to ~10% of the object's scale, a fifth of the
  objects missed, false positives added and the scores random."""
  results = []
  for ann in coco.dataset["annotations"]:
    if ann["iscrowd"] or not ann["num_keypoints"]:
      continue
    kp = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
    score = 1.0
    if rng is not None:
      if rng.random() < 0.2:
        continue
      kp[:, :2] += rng.normal(0, rng.uniform(0.0, 0.08) * np.sqrt(ann["area"]), (len(kp), 2))
      score = float(rng.uniform(0.1, 1.0))
    kp[:, 2] = 1.0
    results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "bbox": list(ann["bbox"]), "score": score,
                    "keypoints": kp.reshape(-1).tolist()})
  if rng is not None:
    for image in coco.dataset["images"]:
      for cat in coco.dataset["categories"]:
        k = len(cat["keypoints"])
        xy = rng.uniform(0, [image["width"], image["height"]], (k, 2))
        results.append({"image_id": image["id"], "category_id": cat["id"],
                        "bbox": [0.0, 0.0, 10.0, 10.0], "score": float(rng.uniform(0.1, 1.0)),
                        "keypoints": np.concatenate([xy, np.ones((k, 1))], 1).reshape(-1).tolist()})
  return results


def _pycocotools(coco: COCO, results: list, sigmas=None, cat_ids=None) -> COCOeval:
  """pycocotools run directly, on box-less results (torchvision's keypoint results)."""
  records = [{k: r[k] for k in ("image_id", "category_id", "keypoints", "score")}
             for r in results if cat_ids is None or r["category_id"] in cat_ids]
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(coco, coco.loadRes(records), "keypoints")
    if sigmas is not None:
      ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
    if cat_ids is not None:
      ev.params.catIds = list(cat_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev


def test_config_default_sigmas_are_pycocotools_coco_person_sigmas():
  sigmas = config_lib.get_base_config().eval.keypoint_oks_sigmas
  np.testing.assert_array_equal(sigmas, Params(iouType="keypoints").kpt_oks_sigmas)
  assert len(sigmas) == 17


def test_ground_truth_keypoints_score_ap_one():
  coco = _keypoint_coco()
  metrics = coco_eval.evaluate_coco(coco, _gt_results(coco), iou_types=("keypoints",))
  kps = metrics["keypoints"]
  assert set(coco_eval.KEYPOINT_STAT_NAMES) <= set(kps)
  for name in ("AP", "AP50", "AP75", "AR", "AR50"):
    assert kps[name] == pytest.approx(1.0), name
  assert kps["per_category"] == {"person": pytest.approx(1.0)}
  assert "Average Precision" in kps["summary"]
  assert coco_eval.format_metrics(metrics).startswith("keypoints: AP 1.000  AP50 1.000")
  assert coco_eval.summary_scalars(metrics) == {
      f"keypoints/{n}": kps[n] for n in ("AP", "AP50", "AP75", "APm", "APl")}


@pytest.mark.parametrize("sigmas", [None, (0.05,) * 17, tuple(np.linspace(0.02, 0.12, 17))])
def test_keypoint_ap_is_pycocotools_run_directly(sigmas):
  """Perturbed predictions (AP well inside (0, 1)) with each result's ``bbox`` kept, as
  detections_to_coco writes it: the 10 numbers are those of pycocotools on box-less results
  with the same sigmas, exactly (the keypoint pass sizes detections by their keypoints)."""
  coco = _keypoint_coco(seed=1)
  results = _gt_results(coco, np.random.default_rng(2))
  ours = coco_eval.evaluate_coco(coco, results, iou_types=("keypoints", "bbox"),
                                 keypoint_oks_sigmas=sigmas)
  direct = _pycocotools(coco, results, sigmas)
  assert 0.2 < ours["keypoints"]["AP"] < 0.9
  for name, value in zip(coco_eval.KEYPOINT_STAT_NAMES, direct.stats):
    assert ours["keypoints"][name] == value, name
  assert ours["bbox"]["AP"] > 0.0  # the box pass still sees the boxes


def test_other_sigmas_give_other_numbers():
  coco = _keypoint_coco(seed=1)
  results = _gt_results(coco, np.random.default_rng(2))
  wide = coco_eval.evaluate_coco(coco, results, ("keypoints",), keypoint_oks_sigmas=(0.2,) * 17)
  narrow = coco_eval.evaluate_coco(coco, results, ("keypoints",),
                                   keypoint_oks_sigmas=(0.01,) * 17)
  assert wide["keypoints"]["AP"] > narrow["keypoints"]["AP"] + 0.2


def test_categories_are_joined_as_one_cocoeval():
  """Two categories with the same K and sigmas: evaluated one by one and joined, every number
  is that of a single pycocotools run over both (COCO's mean over categories)."""
  coco = _keypoint_coco(seed=3, shape_category=True)
  # Both categories with 4 keypoints: the persons keep their first 4.
  for ann in coco.dataset["annotations"]:
    ann["keypoints"] = ann["keypoints"][:12]
    ann["num_keypoints"] = int(np.count_nonzero(np.asarray(ann["keypoints"][2::3]) > 0))
  coco.dataset["categories"][0]["keypoints"] = list(PERSON_KEYPOINTS[:4])
  coco = _coco(coco.dataset)
  results = _gt_results(coco, np.random.default_rng(4))
  sigmas = (0.03, 0.05, 0.07, 0.09)
  ours = coco_eval.evaluate_coco(coco, results, ("keypoints",), keypoint_oks_sigmas=sigmas)
  direct = _pycocotools(coco, results, sigmas)
  assert 0.1 < ours["keypoints"]["AP"] < 0.9
  for name, value in zip(coco_eval.KEYPOINT_STAT_NAMES, direct.stats):
    assert ours["keypoints"][name] == value, name
  assert set(ours["keypoints"]["per_category"]) == {"person", "shape"}


def test_per_category_sigmas():
  """Persons (17 keypoints, COCO's sigmas) and shapes (4 keypoints, their own sigmas from the
  per-category mapping): each category scores what pycocotools gives it alone with its
  sigmas, and AP is the mean over the two."""
  coco = _keypoint_coco(seed=5, shape_category=True)
  results = _gt_results(coco, np.random.default_rng(6))
  shape_sigmas = (0.02, 0.04, 0.06, 0.08)
  ours = coco_eval.evaluate_coco(coco, results, ("keypoints",),
                                 keypoint_oks_sigmas_per_category={"shape": shape_sigmas})
  person = _pycocotools(coco, results, None, [1])
  shape = _pycocotools(coco, results, shape_sigmas, [4])
  per_category = ours["keypoints"]["per_category"]
  assert per_category["person"] == pytest.approx(person.stats[0], rel=1e-12)
  assert per_category["shape"] == pytest.approx(shape.stats[0], rel=1e-12)
  assert per_category["person"] != pytest.approx(per_category["shape"], abs=0.01)
  assert ours["keypoints"]["AP"] == pytest.approx((person.stats[0] + shape.stats[0]) / 2,
                                                  rel=1e-12)
  # The shapes scored with COCO's person sigmas instead: a sigma count mismatch.
  with pytest.raises(ValueError, match=r"eval.keypoint_oks_sigmas has 17 sigmas but category "
                     r"'shape' has 4 keypoints \(top, right, bottom, left\)"):
    coco_eval.evaluate_coco(coco, results, ("keypoints",))


def test_sigma_count_mismatch_and_unknown_category_raise():
  coco = _keypoint_coco()
  with pytest.raises(ValueError, match="has 4 sigmas but category 'person' has 17 keypoints"):
    coco_eval.evaluate_coco(coco, _gt_results(coco), ("keypoints",),
                            keypoint_oks_sigmas=(0.05,) * 4)
  with pytest.raises(ValueError, match=r"keypoint_oks_sigmas_per_category\['person'\] has 3"):
    coco_eval.evaluate_coco(coco, [], ("keypoints",),
                            keypoint_oks_sigmas_per_category={"person": (0.1,) * 3})
  with pytest.raises(ValueError, match=r"names \['persn'\], not categories with keypoints"):
    coco_eval.evaluate_coco(coco, [], ("keypoints",),
                            keypoint_oks_sigmas_per_category={"persn": (0.1,) * 17})
  with pytest.raises(ValueError, match="must be positive"):
    coco_eval.oks_sigmas_by_category(coco.dataset["categories"], (0.0,) * 17)


def test_ground_truth_without_keypoints_raises():
  """An instances JSON (no category lists keypoints): one clear error, even with no results."""
  coco = _coco({"images": [{"id": 1, "height": 10, "width": 10}],
                "categories": [{"id": 1, "name": "square"}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                                 "area": 16.0, "iscrowd": 0,
                                 "segmentation": [[1, 1, 5, 1, 5, 5]]}]})
  for results in ([], [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]):
    with pytest.raises(ValueError, match=r"keypoint evaluation needs a person_keypoints-style "
                       r"ground truth, but no category of it lists 'keypoints' \(categories: "
                       r"\['square'\]\)"):
      coco_eval.evaluate_coco(coco, results, ("bbox", "keypoints"))
  with pytest.raises(ValueError, match="iou_type must be one of"):
    coco_eval.evaluate_coco(coco, [], ("pose",))


def test_no_keypoint_results_give_zeros_and_missing_fields_raise():
  coco = _keypoint_coco()
  metrics = coco_eval.evaluate_coco(coco, [], ("keypoints",))
  assert {metrics["keypoints"][n] for n in coco_eval.KEYPOINT_STAT_NAMES} == {0.0}
  boxes_only = [{k: v for k, v in r.items() if k != "keypoints"} for r in _gt_results(coco)]
  with pytest.raises(ValueError, match="have no 'keypoints'"):
    coco_eval.evaluate_coco(coco, boxes_only, ("keypoints",))


def test_annotations_without_keypoints_fields_are_ignored_regions():
  """A keypoint-category annotation without ``keypoints`` / ``num_keypoints`` (a crowd region,
  say) is scored as COCO scores its own crowd entries (ignored), not a KeyError; a missing
  ``num_keypoints`` is counted from the visibilities."""
  coco = _keypoint_coco()
  results = _gt_results(coco, np.random.default_rng(7))
  want = coco_eval.evaluate_coco(coco, results, ("keypoints",))
  dataset = json.loads(json.dumps(coco.dataset))
  for ann in dataset["annotations"]:
    if ann["iscrowd"]:
      del ann["keypoints"], ann["num_keypoints"]
    else:
      del ann["num_keypoints"]
  got = coco_eval.evaluate_coco(_coco(dataset), results, ("keypoints",))
  for name in coco_eval.KEYPOINT_STAT_NAMES:
    assert got["keypoints"][name] == want["keypoints"][name], name


def test_detections_to_coco_keypoints_in_original_pixels():
  """Ground truth predicted at (sy, sx) = (2, 1.5) network-input pixels: records carry the
  original keypoints (x, y, score) for the category with keypoints only, score AP 1; a model
  without keypoints or masks gets a clear error when they are asked for."""
  rng = np.random.default_rng(8)
  images = [{"id": 1, "height": 120, "width": 160}, {"id": 2, "height": 100, "width": 100}]
  categories = [{"id": 1, "name": "person", "keypoints": list(PERSON_KEYPOINTS),
                 "skeleton": PERSON_SKELETON}, {"id": 5, "name": "ball"}]
  anns = []
  for image in images:
    anns += _instances(rng, image, 1, 17, 10 * image["id"], 2)
  anns.append({"id": 99, "image_id": 2, "category_id": 5, "bbox": [10.0, 10.0, 30.0, 30.0],
               "area": 700.0, "iscrowd": 0})
  coco = _coco({"images": images, "annotations": anns, "categories": categories})
  sy, sx = 2.0, 1.5
  b, d, k = 2, 4, 17
  det = {"boxes": np.zeros((b, d, 4), np.float32), "scores": np.zeros((b, d), np.float32),
         "classes": np.zeros((b, d), np.int32), "valid": np.zeros((b, d), bool),
         "keypoints": np.zeros((b, d, k, 2), np.float32),
         "keypoint_scores": np.tile(np.arange(k, dtype=np.float32), (b, d, 1))}
  for i, image in enumerate(images):
    for j, ann in enumerate(coco.imgToAnns[image["id"]]):
      x, y, w, h = ann["bbox"]
      det["boxes"][i, j] = np.array([x, y, x + w, y + h]) * [sx, sy, sx, sy]
      det["classes"][i, j] = 1 if ann["category_id"] == 1 else 2
      det["scores"][i, j], det["valid"][i, j] = 0.9 - 0.1 * j, True
      if "keypoints" in ann:
        det["keypoints"][i, j] = np.asarray(ann["keypoints"]).reshape(-1, 3)[:, :2] * [sx, sy]
  batch = {"image_id": np.array([1, 2]), "original_size": np.array([[120, 160], [100, 100]]),
           "image_scale": np.tile(np.float32([sy, sx]), (2, 1))}
  records = coco_eval.detections_to_coco(det, batch, {1: 1, 2: 5}, with_masks=False,
                                         with_keypoints=True, keypoint_category_ids={1})
  assert len(records) == 5
  for r in records:
    assert "segmentation" not in r
    if r["category_id"] == 5:
      assert "keypoints" not in r
      continue
    ann = next(a for a in coco.imgToAnns[r["image_id"]]
               if np.allclose(a["bbox"], r["bbox"], atol=1e-3))
    kp = np.asarray(r["keypoints"]).reshape(k, 3)
    assert all(isinstance(v, float) for v in r["keypoints"])
    gt = np.asarray(ann["keypoints"]).reshape(k, 3)
    np.testing.assert_allclose(kp[:, :2], gt[:, :2], atol=1e-4)
    np.testing.assert_array_equal(kp[:, 2], np.arange(k))  # the third number: the score
  json.dumps(records)  # plain JSON types
  metrics = coco_eval.evaluate_coco(coco, records, ("bbox", "keypoints"))
  assert metrics["keypoints"]["AP"] == pytest.approx(1.0)
  assert metrics["bbox"]["AP"] == pytest.approx(1.0)
  # Without keypoint_category_ids every category's detections get keypoints.
  every = coco_eval.detections_to_coco(det, batch, {1: 1, 2: 5}, with_masks=False,
                                       with_keypoints=True)
  assert all("keypoints" in r for r in every)
  no_keypoints = {n: v for n, v in det.items() if not n.startswith("keypoint")}
  with pytest.raises(ValueError, match=r"need the predictions' \['keypoints', "
                     r"'keypoint_scores'\].*is its keypoint branch enabled"):
    coco_eval.detections_to_coco(no_keypoints, batch, {1: 1, 2: 5}, with_masks=False,
                                 with_keypoints=True)
  with pytest.raises(ValueError, match=r"need the predictions' \['masks'\].*mask branch"):
    coco_eval.detections_to_coco(det, batch, {1: 1, 2: 5})


# ----------------------------------------------------------- the evaluator, end to end


class GroundTruthKeypointEvaluator(evaluator_lib.Evaluator):
  """Predicts each image's ground truth boxes and keypoints (a keypoint model without masks);
  with ``shift``, every keypoint moved by that many network-input pixels."""

  def __init__(self, *args, shift: float = 0.0, **kwargs):
    super().__init__(*args, **kwargs)
    self.shift = shift

  def predict_batch(self, variables, host_batch):
    del variables
    valid = host_batch["gt_valid"]
    kp = host_batch["gt_keypoints"]
    return {"boxes": host_batch["gt_boxes"], "classes": host_batch["gt_classes"].astype(np.int32),
            "scores": valid.astype(np.float32), "valid": valid,
            "keypoints": kp[..., :2] + np.float32(self.shift),
            "keypoint_scores": np.where(kp[..., 2] > 0, 5.0, -1.0).astype(np.float32)}


@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes_keypoints"))
  paths = data_lib.generate_shapes(out, num_train=1, num_val=5, size=64, seed=3, keypoints=True)
  c = config_lib.get_base_config()
  c.data.update(paths)
  c.data.image_size = (96, 96)  # scaled by 1.5 and mapped back
  c.data.max_instances = 12
  c.data.eval_batch_size = 2  # 5 images: the last batch has a padding slot
  c.model = tiny_model_config(num_classes=4)
  c.model.mask.enabled = False
  c.model.keypoint.enabled = True
  c.model.keypoint.num_keypoints = 4
  c.eval.iou_types = ("bbox", "keypoints")
  c.eval.keypoint_oks_sigmas = (0.05,) * 4
  return c, sharding.make_mesh(jax.devices()[:1])


def test_evaluator_scores_keypoints(shapes_config, tmp_path):
  """Ground truth keypoints through the eval pipeline (to network-input pixels) and back: AP 1;
  moved by 3 network pixels (2 original ones), lower; the results JSON has the keypoints; the
  overlays draw them; a wrong sigma count fails before anything is predicted."""
  config, mesh = shapes_config
  dataset = data_lib.build_eval_dataset(config)
  metrics = GroundTruthKeypointEvaluator(config, None, mesh).evaluate(
      {}, dataset, workdir=str(tmp_path), step=2, progress=False, num_images_to_draw=1)
  assert metrics["keypoints"]["AP"] == pytest.approx(1.0)
  assert metrics["bbox"]["AP"] > 0.99
  assert set(metrics["keypoints"]["per_category"]) == {"square", "circle", "triangle"}
  assert "segm" not in metrics and metrics["timing"]["num_images"] == 5
  assert len(metrics["images"]) == 1 and metrics["images"][0].dtype == np.uint8
  with open(os.path.join(tmp_path, "eval", "detections_00000002.json")) as f:
    dets = json.load(f)
  assert dets and all(len(d["keypoints"]) == 12 and "segmentation" not in d for d in dets)
  with open(os.path.join(tmp_path, "eval", "metrics_00000002.json")) as f:
    assert json.load(f)["keypoints"]["AP"] == metrics["keypoints"]["AP"]

  shifted = GroundTruthKeypointEvaluator(config, None, mesh, shift=3.0).evaluate(
      {}, dataset, progress=False)
  assert shifted["keypoints"]["AP"] < 0.9 and shifted["bbox"]["AP"] > 0.99

  wrong = config.copy_and_resolve_references()
  wrong.eval.keypoint_oks_sigmas = (0.05,) * 17
  ev = GroundTruthKeypointEvaluator(wrong, None, mesh)
  ev.predict_batch = None  # never reached
  with pytest.raises(ValueError, match="has 17 sigmas but category 'square' has 4 keypoints"):
    ev.evaluate({}, dataset, progress=False)


def test_evaluator_refuses_iou_types_the_model_cannot_score(shapes_config):
  config, mesh = shapes_config
  no_keypoints = config.copy_and_resolve_references()
  no_keypoints.model.keypoint.enabled = False
  with pytest.raises(ValueError, match=r"has 'keypoints' but config.model.keypoint.enabled is "
                     "False"):
    evaluator_lib.Evaluator(no_keypoints, None, mesh)
  segm = config.copy_and_resolve_references()
  segm.eval.iou_types = ("bbox", "segm")
  with pytest.raises(ValueError, match=r"has 'segm' but config.model.mask.enabled is False"):
    evaluator_lib.Evaluator(segm, None, mesh)
  typo = config.copy_and_resolve_references()
  typo.eval.iou_types = ("bbox", "keypoint")
  with pytest.raises(ValueError, match=r"has \['keypoint'\]; known"):
    evaluator_lib.Evaluator(typo, None, mesh)
