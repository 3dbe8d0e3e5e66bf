"""Evaluator over a real eval pipeline: ground truth as predictions scores ~1, shuffled ones low.

The model is replaced by the batch's own ground truth (``predict_batch`` overridden), so the
test checks everything around it: the padded last batch (``example_valid``), the mapping back to
original pixels and COCO ids, mask pasting, the results JSON and the timing report.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import data as data_lib
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
