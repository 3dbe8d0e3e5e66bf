"""Mask R-CNN R50-FPN, 3x schedule (270k steps at batch 16, ~37 COCO epochs), multi-scale train.

Launch::

  python scripts/train.py --config experiments/coco_r50_fpn_3x.py --workdir workdirs/r50_3x \\
    --config.data.train_annotations=... (as in coco_r50_fpn_1x.py)

Hardware and time: 8x A100 or a TPU v3-8, about 1 day. Known results (box / mask AP on
val2017): detectron2 ``mask_rcnn_R_50_FPN_3x`` 41.0 / 37.2. Multi-scale training as detectron2's
(shorter side 640-800, longer <= 1333), with the shorter side drawn uniformly instead of from
its steps of 32.
The global batch (16) is split over all hosts as in coco_r50_fpn_1x.py: 16 / process_count
images per host (e.g. 8 per host on 2 hosts x 4 chips, 2 per device). Training uses the 1x
config's aspect buckets (832 x 1344 and 1344 x 832, ``config.data.buckets``); evaluation pads to
1344 x 1344.
"""

from __future__ import annotations

import os

from mrcnn_jax.config import load_config_file


def get_config(arg: str | None = None):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "coco_r50_fpn_1x.py"), arg)
  config.data.scale_range = (0.8, 1.0)  # shorter side 640..800 (of the 1x config's 800)
  config.train.num_steps = 270_000
  config.train.decay_steps = (210_000, 250_000)
  config.eval.every_steps = 30_000
  return config
