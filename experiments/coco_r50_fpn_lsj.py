"""Mask R-CNN R50-FPN with large-scale jitter (Ghiasi et al. 2021): 1024x1024, 100 epochs, batch 64.

Trained from scratch-friendly normalisation: trainable BatchNorm (``norm='bn'``) whose batch
statistics XLA computes over the whole global batch (the step is jitted over the data-parallel
mesh), i.e. synchronised BatchNorm as in detectron2's recipe. Every training image is cropped or
padded to the one 1024 x 1024 square (no aspect buckets, unlike the 1x/3x recipes).

Launch (TPU v3-32 / v4-32 pod slice or 4 hosts x 8 GPUs; global batch 64 = 16 per host on 4
hosts)::

  python scripts/train.py --config experiments/coco_r50_fpn_lsj.py --workdir /mnt/shared/workdirs/lsj \\
    --config.data.train_annotations=... (as in coco_r50_fpn_1x.py)

Hardware and time: 32 TPU v3 cores, about 1.5 days. Known results (box / mask AP on val2017):
detectron2's "new baselines" ``mask_rcnn_R_50_FPN_100ep_LSJ`` 42.5 / 38.0.
"""

from __future__ import annotations

import os

from mrcnn_jax.config import load_config_file


def get_config(arg: str | None = None):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "coco_r50_fpn_1x.py"), arg)
  config.data.image_size = (1024, 1024)
  config.data.buckets = ()  # LSJ crops to the one 1024 x 1024 square (no aspect buckets)
  config.data.min_size = config.data.max_size = 0  # LSJ scales to fit 1024 x 1024, then jitters
  config.data.scale_range = (0.1, 2.0)  # large-scale jitter, then a random 1024x1024 crop
  config.model.norm = "bn"
  config.model.backbone.trainable_layers = 5
  config.train.batch_size = 64
  config.train.base_learning_rate = 0.1
  config.train.base_batch_size = 64
  config.train.weight_decay = 4e-5
  config.train.warmup_steps = 250
  # 100 epochs of 118k images at 64 per step = 184k steps; decay at 88.9% and 96.3%.
  config.train.num_steps = 184_375
  config.train.decay_steps = (163_889, 177_546)
  config.eval.every_steps = 20_000
  return config
