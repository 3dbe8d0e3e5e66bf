"""Keypoint R-CNN R50-FPN on COCO person keypoints, 1x schedule (90k steps at batch 16).

The Mask R-CNN paper's pose model (sec. 5): the box branch plus a keypoint branch of 8 3x3
convs of 512 and a 2x-upsampled transposed conv, K = 17 one-hot 56x56 heatmaps per person; no
mask branch (torchvision's ``keypointrcnn_resnet50_fpn``). Launch as the mask recipe, with the
person-keypoints JSONs::

  python scripts/train.py --config experiments/coco_keypoint_r50_fpn_1x.py \\
    --workdir workdirs/kp_r50_1x \\
    --config.data.train_annotations=$COCO/annotations/person_keypoints_train2017.json \\
    --config.data.train_images=$COCO/train2017 \\
    --config.data.eval_annotations=$COCO/annotations/person_keypoints_val2017.json \\
    --config.data.eval_images=$COCO/val2017 \\
    --config.init_weights=weights/resnet50_imagenet

Hardware and time: as ``coco_r50_fpn_1x.py`` (8 accelerators, about 8-10 hours). Known results
(val2017, person box AP / keypoint AP): Detectron2 ``keypoint_rcnn_R_50_FPN_1x`` 53.6 / 64.0
(this schedule); torchvision ``keypointrcnn_resnet50_fpn`` COCO_V1 weights 54.6 / 65.0 (46
epochs, shorter side drawn from 640-800). Training scales each image by 0.8-1.0 of the 800 /
1333 resize (shorter side 640-800, as both references draw it). Person images without a
labelled keypoint still train the box branch; their RoIs get no keypoint loss.
"""

from __future__ import annotations

import os

from mrcnn_jax.config import load_config_file


def get_config(arg: str | None = None):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "coco_r50_fpn_1x.py"), arg)
  config.model.num_classes = 2  # person + background
  config.model.mask.enabled = False
  config.model.keypoint.enabled = True
  config.model.keypoint.num_keypoints = 17
  config.data.scale_range = (0.8, 1.0)  # shorter side 640-800
  config.eval.iou_types = ("bbox", "keypoints")
  return config
