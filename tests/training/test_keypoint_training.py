"""The synthetic keypoint experiment (``experiments/shapes_keypoints.py``) through the training
loop: masks and keypoints trained in one step on 2 devices, then COCO bbox, segm and keypoint
(OKS) evaluation with the experiment's own sigmas, keypoints in the results JSON."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import data as data_lib
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_shapes_keypoint_experiment_trains_and_evaluates(tmp_path):
  data_dir = str(tmp_path / "shapes")
  data_lib.generate_shapes(data_dir, num_train=12, num_val=4, size=64, seed=1, keypoints=True)
  c = config_lib.load_config_file(str(ROOT / "experiments" / "shapes_keypoints.py"), data_dir)
  # The experiment as it is, on the test suite's tiny model and a few steps.
  model = tiny_model_config(num_classes=4)
  model.keypoint.update(c.model.keypoint)
  model.keypoint.conv_channels = (16, 16)
  model.keypoint.rois_per_image = model.mask.rois_per_image
  c.model = model
  c.num_devices = 2
  c.data.image_size, c.data.max_instances, c.data.mask_size = (64, 64), 8, 16
  c.data.eval_batch_size = 2
  c.train.batch_size, c.train.num_steps = 2, 3
  c.train.warmup_steps, c.train.decay_steps = 1, ()
  c.checkpoint.every_steps, c.log.every_steps = 3, 1
  c.eval.num_images_to_draw = 1

  result = loop.train_and_evaluate(c, str(tmp_path / "run"))

  assert result["step"] == 3
  train = result["train"]
  assert np.isfinite(train["roi_keypoint"]) and np.isfinite(train["roi_mask"])
  assert train["roi_keypoint"] > 0  # the heatmap cross-entropy, near log(56 * 56) untrained
  metrics = result["eval"]
  assert set(c.eval.iou_types) <= set(metrics)
  for name in ("AP", "AP50", "AP75", "APm", "APl", "AR"):
    assert np.isfinite(metrics["keypoints"][name]), name
  with open(os.path.join(tmp_path, "run", "eval", "detections_00000003.json")) as f:
    detections = json.load(f)
  assert detections and all(len(d["keypoints"]) == 3 * 4 for d in detections)
  assert all("segmentation" in d for d in detections)
