"""Mask R-CNN R50-FPN, 1x schedule (90k steps at batch 16, ~12 COCO epochs), torchvision recipe.

Launch (one host with 8 accelerators, or any mesh whose device count divides 16)::

  python scripts/train.py --config experiments/coco_r50_fpn_1x.py --workdir workdirs/r50_1x \\
    --config.data.train_annotations=$COCO/annotations/instances_train2017.json \\
    --config.data.train_images=$COCO/train2017 \\
    --config.data.eval_annotations=$COCO/annotations/instances_val2017.json \\
    --config.data.eval_images=$COCO/val2017 \\
    --config.init_weights=weights/resnet50_imagenet

Hardware and time: 8x A100 or a TPU v3-8, about 8-10 hours (torchvision's reference takes ~9 h
on 8x V100 at 2 images per GPU). Known results of this recipe (box AP / mask AP on val2017):
torchvision ``maskrcnn_resnet50_fpn`` 37.9 / 34.6 (26 epochs); detectron2
``mask_rcnn_R_50_FPN_1x`` 38.6 / 35.2. The backbone starts from ImageNet weights
(``config.init_weights``), with frozen BatchNorm and the stem and stage 1 frozen.
The global batch (16) is split over all hosts: each host feeds 16 / process_count images.
Training batches come in two aspect buckets (``config.data.buckets``: 832 x 1344 for landscape
and square images, 1344 x 832 for portrait ones; each global batch from one of them), ~40% fewer
pixels than the 1344 x 1344 square evaluation pads to; the train step compiles once per bucket.
"""

from __future__ import annotations

from mrcnn_jax.config import get_base_config


def get_config(arg: str | None = None):
  del arg
  config = get_base_config()
  config.model.num_classes = 81  # 80 COCO categories (contiguous ids) + background
  # torchvision / Detectron2's resize: shorter side 800, longer <= 1333. Training pads to an
  # aspect bucket (landscape 832 x 1344, portrait 1344 x 832: multiples of 64 that hold 800 x
  # 1333), evaluation to the 1344 x 1344 square.
  config.data.min_size = 800
  config.data.max_size = 1333
  config.data.image_size = (1344, 1344)
  config.data.buckets = ((832, 1344), (1344, 832))
  config.data.scale_range = (1.0, 1.0)
  config.train.batch_size = 16
  config.train.num_steps = 90_000
  config.train.decay_steps = (60_000, 80_000)
  config.model.compute_dtype = "bfloat16"
  config.checkpoint.every_steps = 5000
  config.eval.every_steps = 10_000
  config.log.every_steps = 100
  return config
