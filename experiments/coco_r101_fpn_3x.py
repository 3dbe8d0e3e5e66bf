"""Mask R-CNN R101-FPN, 3x schedule (270k steps at batch 16), multi-scale training.

Launch::

  python scripts/train.py --config experiments/coco_r101_fpn_3x.py --workdir workdirs/r101_3x \\
    --config.data.train_annotations=... (as in coco_r50_fpn_1x.py) \\
    --config.init_weights=weights/resnet101_imagenet

Hardware and time: 8x A100 or a TPU v3-8, about 1.5 days. Known results (box / mask AP on
val2017): detectron2 ``mask_rcnn_R_101_FPN_3x`` 42.9 / 38.6.
"""

from __future__ import annotations

import importlib.util
import os


def _sibling(name: str):
  """Loads another experiment file of this folder by path (config files are loaded by path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  config = _sibling('coco_r50_fpn_3x').get_config(arg)
  config.model.backbone.depth = 101
  return config
