"""Evaluator over a real eval pipeline: ground truth as predictions scores ~1, shuffled ones low.

The model is replaced by the batch's own ground truth (``predict_batch`` overridden), so the
test checks everything around it: the padded last batch (``example_valid``), the mapping back to
original pixels and COCO ids, mask pasting, the results JSON and the timing report.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import data as data_lib
from mrcnn_jax.evaluation import coco_eval
from mrcnn_jax.evaluation import evaluator as evaluator_lib
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.run import sharding


class GroundTruthEvaluator(evaluator_lib.Evaluator):
  """Predicts each image's ground truth (optionally with the classes rotated)."""

  def __init__(self, *args, shuffle: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self.shuffle = shuffle

  def predict_batch(self, variables, host_batch):
    del variables
    classes = host_batch["gt_classes"]
    if self.shuffle:  # every instance gets another (wrong) class
      classes = np.where(host_batch["gt_valid"], classes % 3 + 1, 0)
    return {"boxes": host_batch["gt_boxes"], "classes": classes.astype(np.int32),
            "scores": host_batch["gt_valid"].astype(np.float32),
            "masks": host_batch["gt_masks"].astype(np.float32),
            "valid": host_batch["gt_valid"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes"))
  paths = data_lib.generate_shapes(out, num_train=2, num_val=7, size=64, seed=3)
  c = config_lib.get_base_config()
  c.data.update(paths)
  c.data.image_size = (96, 96)  # images of longer side 64 are scaled by 1.5 and mapped back
  c.data.max_instances = 12
  c.data.mask_size = 28  # GT masks at the predicted masks' resolution: pasted as predictions
  c.data.eval_batch_size = 3  # 7 images: the last batch has 2 padding slots
  c.model = tiny_model_config(num_classes=4)
  mesh = sharding.make_mesh(jax.devices()[:1])
  return c, mesh


def test_ground_truth_scores_one_and_shuffled_scores_low(setup, tmp_path):
  config, mesh = setup
  dataset = data_lib.build_eval_dataset(config)
  ev = GroundTruthEvaluator(config, None, mesh)
  metrics = ev.evaluate({}, dataset, workdir=str(tmp_path), step=5, progress=False,
                        num_images_to_draw=2)
  assert metrics["bbox"]["AP"] > 0.99
  assert metrics["segm"]["AP50"] > 0.99 and metrics["segm"]["AP"] > 0.6
  assert metrics["timing"]["num_images"] == 7
  assert metrics["data"]["summary"] == "evaluated 7 of 7 images; 0 annotations refused"
  assert 0.0 <= metrics["timing"]["postprocess_share"] <= 1.0
  assert len(metrics["images"]) == 2 and metrics["images"][0].dtype == np.uint8
  with open(os.path.join(tmp_path, "eval", "metrics_00000005.json")) as f:
    saved = json.load(f)
  assert saved["step"] == 5 and saved["segm"]["AP"] == metrics["segm"]["AP"]
  with open(os.path.join(tmp_path, "eval", "detections_00000005.json")) as f:
    dets = json.load(f)
  assert {d["category_id"] for d in dets} <= {1, 3, 7}  # the shapes set's sparse COCO ids
  assert -1 not in {d["image_id"] for d in dets}  # padding slots produce nothing

  shuffled = GroundTruthEvaluator(config, None, mesh, shuffle=True).evaluate(
      {}, dataset, progress=False)
  assert shuffled["bbox"]["AP"] < 0.05 and shuffled["segm"]["AP"] < 0.05


class NoisyGroundTruthEvaluator(GroundTruthEvaluator):
  """Ground truth with every third instance given another class and falling scores: AP < 1."""

  def predict_batch(self, variables, host_batch):
    out = super().predict_batch(variables, host_batch)
    valid = host_batch["gt_valid"]
    n = valid.shape[1]
    wrong = valid & ((np.arange(n)[None, :] + host_batch["image_id"][:, None]) % 3 == 0)
    out["classes"] = np.where(wrong, out["classes"] % 3 + 1, out["classes"]).astype(np.int32)
    out["scores"] = np.where(valid, 1.0 - 0.05 * np.arange(n), 0.0).astype(np.float32)
    return out


def _hostile_folder(out: str):
  """A shapes val split with one polygon of 3 numbers, one truncated JPEG and one missing
  file; and the same split with those entries removed. Returns two (json, image dir) pairs.

  Image indices: the truncated JPEG is read by host 0 and the missing file by host 1 of 2
  with a global batch of 4 (host p reads rows 2p, 2p + 1 of each batch).
  """
  paths = data_lib.generate_shapes(os.path.join(out, "shapes"), num_train=1, num_val=8,
                                   size=64, seed=5)
  with open(paths["eval_annotations"]) as f:
    d = json.load(f)
  anns = {}
  for a in d["annotations"]:
    if not a["iscrowd"]:
      anns.setdefault(a["image_id"], []).append(a)
  index = {img["id"]: k for k, img in enumerate(d["images"])}
  labelled = [img for img in d["images"] if img["id"] in anns]
  truncated = next(i for i in labelled if i["file_name"].endswith(".jpg")
                   and index[i["id"]] % 4 < 2)
  missing = next(i for i in labelled if index[i["id"]] % 4 >= 2)
  bad = next(anns[i["id"]][0] for i in labelled
             if i not in (truncated, missing) and len(anns[i["id"]]) >= 2)
  images = os.path.join(out, "hostile_images")
  shutil.copytree(paths["eval_images"], images)
  path = os.path.join(images, truncated["file_name"])
  with open(path, "rb") as f:
    jpeg = f.read()
  with open(path, "wb") as f:
    f.write(jpeg[:len(jpeg) // 2])
  os.remove(os.path.join(images, missing["file_name"]))
  gone = {truncated["id"], missing["id"]}
  clean = dict(d, images=[i for i in d["images"] if i["id"] not in gone],
               annotations=[a for a in d["annotations"]
                            if a["image_id"] not in gone and a["id"] != bad["id"]])
  bad["segmentation"] = [[50, 50, 55]]  # an odd number of coordinates
  folders = []
  for name, data, image_dir in (("hostile", d, images), ("clean", clean, paths["eval_images"])):
    ann = os.path.join(out, f"{name}.json")
    with open(ann, "w") as f:
      json.dump(data, f)
    folders.append((ann, image_dir))
  return folders


def _eval_config(config, ann, images):
  c = config.copy_and_resolve_references()
  c.data.eval_annotations, c.data.eval_images = ann, images
  return c


def test_refused_annotations_and_unreadable_images_are_not_scored(setup, tmp_path):
  """The hostile folder scores what the same folder scores with its broken entries removed."""
  config, mesh = setup
  hostile, clean = _hostile_folder(str(tmp_path))
  ev = NoisyGroundTruthEvaluator(config, None, mesh)
  got = ev.evaluate({}, data_lib.build_eval_dataset(_eval_config(config, *hostile)),
                    workdir=str(tmp_path / "work"), step=3, progress=False)
  want = ev.evaluate({}, data_lib.build_eval_dataset(_eval_config(config, *clean)),
                     progress=False)
  assert got["data"]["summary"] == ("evaluated 6 of 8 images (skipped: corrupt_image 1, "
                                    "missing_image 1); 1 annotation refused: bad_annotation 1")
  assert got["data"]["images_evaluated"] == 6 and got["data"]["images_listed"] == 8
  assert want["data"]["summary"] == "evaluated 6 of 6 images; 0 annotations refused"
  for iou_type in ("bbox", "segm"):
    assert 0.1 < want[iou_type]["AP"] < 0.9  # the noise makes AP informative
    for name in coco_eval.STAT_NAMES:
      assert got[iou_type][name] == want[iou_type][name], (iou_type, name)
  with open(tmp_path / "work" / "eval" / "metrics_00000003.json") as f:
    assert json.load(f)["data"] == got["data"]


def test_several_hosts_gather_what_each_could_not_read(setup, tmp_path, monkeypatch):
  """Two hosts, one failed image each: host 0 gathers host 1's records, evaluated ids and load
  failures and reports what one process reports."""
  config, mesh = setup
  hostile, _ = _hostile_folder(str(tmp_path))
  c = _eval_config(config, *hostile)
  ev = NoisyGroundTruthEvaluator(config, None, mesh)
  single = ev.evaluate({}, data_lib.build_eval_dataset(c, global_batch_size=4), progress=False)

  def host_dataset(p):
    return data_lib.build_eval_dataset(c, global_batch_size=4, process_index=p, process_count=2)

  sent = []  # what host 1 contributes to each gather, in call order
  monkeypatch.setattr(evaluator_lib, "_allgather_records", lambda x: sent.append(list(x)) or x)
  host1 = ev.evaluate({}, host_dataset(1), progress=False)
  assert host1["data"]["images_evaluated"] == 3
  assert sent[2] == [(sent[2][0][0], "missing_image")]  # host 1's only failure
  received = iter(sent)
  monkeypatch.setattr(evaluator_lib, "_allgather_records", lambda x: list(x) + next(received))
  host0 = ev.evaluate({}, host_dataset(0), progress=False)
  assert host0["data"] == single["data"]
  assert "corrupt_image 1, missing_image 1" in host0["data"]["summary"]
  for iou_type in ("bbox", "segm"):
    for name in coco_eval.STAT_NAMES:
      assert host0[iou_type][name] == single[iou_type][name], (iou_type, name)
