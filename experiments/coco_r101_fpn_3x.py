"""Mask R-CNN R101-FPN, 3x schedule (270k steps at batch 16), multi-scale training.

Launch::

  python scripts/train.py --config experiments/coco_r101_fpn_3x.py --workdir workdirs/r101_3x \\
    --config.data.train_annotations=... (as in coco_r50_fpn_1x.py) \\
    --config.init_weights=weights/resnet101_imagenet

Hardware and time: 8x A100 or a TPU v3-8, about 1.5 days. Known results (box / mask AP on
val2017): detectron2 ``mask_rcnn_R_101_FPN_3x`` 42.9 / 38.6.
The global batch (16) is split over all hosts: 16 / process_count images per host, 2 per
device on 8 devices. Training uses the 1x config's aspect buckets (832 x 1344 and 1344 x 832,
``config.data.buckets``); evaluation pads to 1344 x 1344.
"""

from __future__ import annotations

import os

from mrcnn_jax.config import load_config_file


def get_config(arg: str | None = None):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "coco_r50_fpn_3x.py"), arg)
  config.model.backbone.depth = 101
  return config
