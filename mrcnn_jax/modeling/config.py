"""Model hyper-parameters (``config.model``); defaults are torchvision's maskrcnn_resnet50_fpn."""

from __future__ import annotations

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_classes = 91  # including background (index 0), torchvision's COCO layout
  c.compute_dtype = "float32"  # activations; params and losses stay float32
  # Pixel normalisation, applied on device to uint8 RGB images.
  c.pixel_mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  c.pixel_std = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  return c
