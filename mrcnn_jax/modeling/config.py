"""Model hyper-parameters (``config.model``); defaults are torchvision's maskrcnn_resnet50_fpn.

Every number the model uses lives here, so an experiment changes behaviour by overriding a
field, never by editing code. Sub-sections: ``backbone``, ``fpn``, ``anchors``, ``rpn``, ``roi``
(box branch and detection post-processing), ``mask`` and ``keypoint`` (the pose branch of the
paper's sec. 5, off by default). ``norm`` and ``detections_per_image`` sit at the top level
because the training and evaluation code read them directly.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """Returns torchvision's ``maskrcnn_resnet50_fpn`` (v1) hyper-parameters."""
  c = ml_collections.ConfigDict()
  c.num_classes = 91  # including background (index 0), torchvision's COCO layout
  c.compute_dtype = "float32"  # activations; params, box math and losses stay float32
  # Pixel normalisation, applied on device to uint8 RGB images.
  c.pixel_mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  c.pixel_std = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  # Backbone normalisation: 'frozen_bn' (torchvision FrozenBatchNorm2d: statistics and affine
  # fixed), 'gn' (GroupNorm, trainable) or 'bn' (BatchNorm with batch statistics in training).
  c.norm = "frozen_bn"
  c.detections_per_image = 100

  c.backbone = ml_collections.ConfigDict()
  c.backbone.depth = 50  # 50 or 101
  c.backbone.stage_blocks = None  # e.g. (1, 1, 1, 1): overrides the depth's (3, 4, 6, 3)
  c.backbone.width = 64  # stem channels; stage i has width * 2**i bottleneck channels
  # torchvision's ``trainable_layers``: how many of (layer4, layer3, layer2, layer1, conv1) train.
  # 3 freezes the stem and layer1, as maskrcnn_resnet50_fpn does with pretrained weights.
  c.backbone.trainable_layers = 3
  # With norm 'bn', the BatchNorms of the stages trainable_layers freezes use, in training,
  # 'running': their running statistics (the stage is fixed, as Detectron2 freezes it) or
  # 'batch': batch statistics, as torchvision's train mode (it only cuts their gradients).
  c.backbone.frozen_stage_statistics = "running"
  c.backbone.norm_eps = 1e-5
  c.backbone.bn_momentum = 0.9  # flax convention: running = m * running + (1 - m) * batch
  c.backbone.gn_groups = 32
  # Stride of each stage's first block on its first 1x1 conv (MSRA ResNet, Detectron2's model
  # zoo: RESNETS.STRIDE_IN_1X1) instead of on the 3x3 conv (torchvision, "ResNet v1.5").
  c.backbone.stride_in_1x1 = False
  # Rematerialisation (jax.checkpoint) in training: 'none'; 'blocks' keeps only each
  # bottleneck's output and recomputes its inside in the backward pass; 'stages' keeps only
  # each stage's output. Trades compute for activation memory; the numbers are the same.
  c.backbone.remat = "none"

  c.fpn = ml_collections.ConfigDict()
  c.fpn.channels = 256
  # Norm after each lateral and output conv (convs then have no bias): 'none' (v1), or
  # 'frozen_bn' / 'bn' / 'gn' (maskrcnn_resnet50_fpn_v2 has BatchNorm).
  c.fpn.norm = "none"

  c.anchors = ml_collections.ConfigDict()
  c.anchors.strides = (4, 8, 16, 32, 64)  # P2..P6
  c.anchors.sizes = ((32,), (64,), (128,), (256,), (512,))
  c.anchors.aspect_ratios = (0.5, 1.0, 2.0)
  # Round the zero-centred cell anchors to whole pixels (torchvision); Detectron2 does not.
  c.anchors.round = True
  # Space each level's anchors (padded size) // (grid size) apart per axis, as torchvision's
  # AnchorGenerator, instead of by ``strides``: they differ where the padded size is not a
  # multiple of the stride (P6 of an 800-high input: 61). Converted torchvision models set it.
  c.anchors.strides_from_grid = False

  c.rpn = ml_collections.ConfigDict()
  c.rpn.head_convs = 1  # 3x3 conv + ReLU layers before the predictors (v2: 2)
  c.rpn.pre_nms_top_k_train = 2000  # per level
  c.rpn.pre_nms_top_k_test = 1000
  c.rpn.post_nms_top_k_train = 2000  # per image, over all levels
  c.rpn.post_nms_top_k_test = 1000
  c.rpn.nms_threshold = 0.7
  c.rpn.min_size = 1e-3
  c.rpn.score_threshold = 0.0
  c.rpn.fg_iou_threshold = 0.7
  c.rpn.bg_iou_threshold = 0.3
  c.rpn.batch_size_per_image = 256
  c.rpn.positive_fraction = 0.5
  c.rpn.box_loss_beta = 1.0 / 9
  c.rpn.box_weights = (1.0, 1.0, 1.0, 1.0)

  c.roi = ml_collections.ConfigDict()
  c.roi.fg_iou_threshold = 0.5
  c.roi.bg_iou_threshold = 0.5
  c.roi.batch_size_per_image = 512
  c.roi.positive_fraction = 0.25
  c.roi.box_weights = (10.0, 10.0, 5.0, 5.0)
  c.roi.box_loss_beta = 1.0 / 9
  c.roi.pooler_size = 7
  c.roi.sampling_ratio = 2
  c.roi.aligned = False  # torchvision v1 MultiScaleRoIAlign
  c.roi.canonical_scale = 224
  c.roi.canonical_level = 4
  c.roi.representation_size = 1024
  # Box head: 0 convs = TwoMLPHead (2 fc of representation_size, v1); n > 0 = n 3x3 convs of
  # box_head_conv_channels with box_head_norm, then 1 fc (FastRCNNConvFCHead, v2: 4 convs, 'bn').
  c.roi.box_head_convs = 0
  c.roi.box_head_conv_channels = 256
  c.roi.box_head_norm = "none"
  c.roi.score_threshold = 0.05
  c.roi.nms_threshold = 0.5
  c.roi.min_size = 1e-2
  # Optional cap on the (box, class) candidates entering the class-aware NMS, best first.
  # None (torchvision) keeps every candidate above the score threshold; the static-shape NMS
  # skips the rest cheaply, so a cap only saves the sort.
  c.roi.pre_nms_top_k = None

  c.mask = ml_collections.ConfigDict()
  # False drops the mask branch entirely (no parameters, loss or ``masks`` output), as
  # torchvision's keypointrcnn_resnet50_fpn, a box + keypoint model.
  c.mask.enabled = True
  c.mask.pooler_size = 14
  c.mask.sampling_ratio = 2
  c.mask.conv_channels = (256, 256, 256, 256)
  c.mask.norm = "none"  # after each mask conv (convs then have no bias); v2: BatchNorm
  # Foreground RoIs per image that get a mask loss: a fixed count so shapes stay static.
  # roi.batch_size_per_image * roi.positive_fraction (128) holds every sampled positive.
  c.mask.rois_per_image = 128
  # Bilinear samples per bin and axis of the mask targets: torchvision takes ceil(side / 28),
  # i.e. more for RoIs longer than 56 px; a static cap keeps shapes fixed (``ops.masks``).
  # Raise it to the longest RoI side / 28 for exact torchvision targets.
  c.mask.target_sampling_ratio = 2
  # Where a 28x28 mask sits in its box (``ops.masks``): False is torchvision's pair (targets
  # read half a pixel off, pasted onto the box grown to whole pixels: a perfect mask comes back
  # up to a pixel shifted and too large), True the half-pixel-exact pair, as Detectron2's.
  # Pair it with roi.aligned = True (RoIAlign's own half-pixel fix).
  c.mask.aligned = False
  # The mask head runs in chunks of slots per image whose sizes double from this one
  # (8, 8, 16, 32, 64 for 128 slots); chunks with no positive (no valid detection at
  # inference) are skipped. Same results; 0 runs all slots at once.
  c.mask.chunk_size = 8

  # Keypoint branch (Mask R-CNN sec. 5, torchvision's keypointrcnn_resnet50_fpn): each keypoint
  # is a one-hot mask, K heatmaps per RoI from 8 3x3 convs, a deconv and 2x upsampling.
  c.keypoint = ml_collections.ConfigDict()
  c.keypoint.enabled = False
  c.keypoint.num_keypoints = 17  # K: COCO's person keypoints
  c.keypoint.pooler_size = 14  # RoIAlign output; heatmaps are 4x this (56)
  c.keypoint.sampling_ratio = 2
  c.keypoint.conv_channels = (512,) * 8
  # Leading (positive-first) RoI slots per image that get a keypoint loss, as mask.rois_per_image.
  c.keypoint.rois_per_image = 128
  c.keypoint.loss_weight = 1.0
  # Static cap on the side a heatmap is upsampled to before its argmax (torchvision: the RoI's
  # own ceil(w) x ceil(h), exact up to this side; longer ones read a grid of this many cells).
  # Costs D * K * max_resize**2 float32 per image (111 MB at 100 x 17 x 128**2).
  c.keypoint.max_resize = 128
  # Chunked like the mask head (mask.chunk_size): chunks of slots with no positive are skipped.
  c.keypoint.chunk_size = 8
  return c


def tiny_model_config(num_classes: int = 3) -> ml_collections.ConfigDict:
  """A narrow R50-FPN for fast CPU tests on 64-128 px images.

  Same code paths as the full model (all five FPN levels, RPN, box and mask branches) with
  narrow layers, few blocks and few RoIs so one forward/backward compiles and runs in seconds.
  """
  c = model_config()
  c.num_classes = num_classes
  c.backbone.stage_blocks = (1, 1, 1, 1)
  c.backbone.width = 8
  c.backbone.gn_groups = 4
  c.fpn.channels = 32
  c.anchors.sizes = ((8,), (16,), (32,), (64,), (128,))
  c.rpn.pre_nms_top_k_train = 200
  c.rpn.pre_nms_top_k_test = 100
  c.rpn.post_nms_top_k_train = 100
  c.rpn.post_nms_top_k_test = 50
  c.rpn.batch_size_per_image = 64
  c.roi.batch_size_per_image = 64
  c.roi.representation_size = 64
  c.mask.conv_channels = (32, 32)
  c.mask.rois_per_image = 16
  c.mask.chunk_size = 8  # two chunks: the skipping path runs in the tests
  c.detections_per_image = 10
  return c


def upgrade_model_config(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A model config saved by any version (its JSON as a dict) as a current ``ConfigDict``.

  The one place an old config is upgraded: fields it lacks take today's defaults (which keep
  the layout it was trained with: v1 heads, no norms), JSON lists become tuples, and fields
  it has that the defaults do not are kept (so a comparison still sees them).
  """
  config = model_config()
  _overlay(config, saved)
  return config


def _overlay(config: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> None:
  for key, value in saved.items():
    if isinstance(value, Mapping) and isinstance(config.get(key), ml_collections.ConfigDict):
      _overlay(config[key], value)
    else:
      with config.ignore_type():
        config[key] = _as_tuples(value)


def _as_tuples(value: Any) -> Any:
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value
