"""Mask R-CNN R50-FPN, 3x schedule (270k steps at batch 16, ~37 COCO epochs), multi-scale train.

Launch::

  python scripts/train.py --config experiments/coco_r50_fpn_3x.py --workdir workdirs/r50_3x \\
    --config.data.train_annotations=... (as in coco_r50_fpn_1x.py)

Hardware and time: 8x A100 or a TPU v3-8, about 1 day. Known results (box / mask AP on
val2017): detectron2 ``mask_rcnn_R_50_FPN_3x`` 41.0 / 37.2. Scale jitter replaces detectron2's
multi-scale shorter side (640-800) with a uniform factor on the fitted size.
The global batch (16) is split over all hosts as in coco_r50_fpn_1x.py: 16 / process_count
images per host (e.g. 8 per host on 2 hosts x 4 chips, 2 per device).
"""

from __future__ import annotations

import os

from mrcnn_jax.config import load_config_file


def get_config(arg: str | None = None):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "coco_r50_fpn_1x.py"), arg)
  config.data.scale_range = (0.8, 1.0)  # ~ shorter side 640..800 of a 800 base
  config.train.num_steps = 270_000
  config.train.decay_steps = (210_000, 250_000)
  config.eval.every_steps = 30_000
  return config
