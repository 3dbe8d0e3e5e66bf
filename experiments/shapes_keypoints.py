"""Keypoint R-CNN on the synthetic shapes set: masks and keypoints, one train step, a CPU.

Each shape carries K = 4 keypoints, its extreme points ("top", "right", "bottom", "left":
the corners of squares and triangles, a circle's four extreme points), written by
``python -m mrcnn_jax.data.shapes --keypoints``. Launch::

  python -m mrcnn_jax.data.shapes --out data_cache/shapes_keypoints --keypoints
  python scripts/train.py --config experiments/shapes_keypoints.py \\
    --workdir workdirs/shapes_keypoints

The model is the main job's (``experiments/shapes.py``) with the keypoint branch on (a narrow
head: 4 convs of 64 instead of 8 of 512) beside the mask branch; evaluation adds COCO keypoint
AP (OKS) with one sigma for every point (``eval.keypoint_oks_sigmas``). Known result on the
50-image val split: see the README's "Keypoints" section (measured with this file as it is).
``get_config('DIR')`` points the data paths at another keypoint shapes folder.
"""

from __future__ import annotations

import os

from mrcnn_jax.config import load_config_file

DEFAULT_DATA_DIR = "data_cache/shapes_keypoints"
NUM_KEYPOINTS = 4
# OKS sigma of every shape point: a corner is sharp, so tighter than COCO's hips (0.107) and
# about its wrists (0.062); 0.05 ~ a 3-4 px tolerance on the shapes' ~40 px boxes at OKS 0.5.
OKS_SIGMA = 0.05


def get_config(arg: str | None = None):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "shapes.py"),
                            arg or DEFAULT_DATA_DIR)
  k = config.model.keypoint
  k.enabled = True
  k.num_keypoints = NUM_KEYPOINTS
  k.conv_channels = (64,) * 4
  k.rois_per_image = config.model.mask.rois_per_image
  config.eval.iou_types = ("bbox", "segm", "keypoints")
  config.eval.keypoint_oks_sigmas = (OKS_SIGMA,) * NUM_KEYPOINTS
  return config
