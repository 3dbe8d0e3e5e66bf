"""The synthetic inputs the benchmarks and the profiler feed the full model.

Random uint8 images and ``num_objects`` rectangle instances per image (full masks), in the
batch contract of ``mrcnn_jax.data``, plus the default config at a given input size.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mrcnn_jax import config as config_lib


def model_config(height: int, width: int, batch: int,
                 compute_dtype: str = "float32") -> ml_collections.ConfigDict:
  """The default (R50-FPN, 91 classes) config at ``height`` x ``width``, ``batch`` per step."""
  config = config_lib.get_base_config()
  config.model.compute_dtype = compute_dtype
  config.data.image_size = (height, width)
  config.train.batch_size = batch
  return config


def train_batch(rng: np.random.Generator, batch: int, height: int, width: int,
                max_instances: int, mask_size: int, num_objects: int = 4) -> dict:
  """A host batch: ``image`` [B, H, W, 3] uint8, ``num_objects`` random boxes per image.

  ``gt_boxes`` [B, max_instances, 4] float32 xyxy pixels, ``gt_masks``
  [B, max_instances, mask_size, mask_size] uint8 (all ones for a valid instance), the rest as
  ``mrcnn_jax.data`` gives them for unscaled, unpadded images.
  """
  images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
  boxes = np.zeros((batch, max_instances, 4), np.float32)
  classes = np.zeros((batch, max_instances), np.int32)
  valid = np.zeros((batch, max_instances), bool)
  for b in range(batch):
    for i in range(num_objects):
      w, h = rng.integers(32, min(height, width) // 2, size=2)
      x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
      boxes[b, i] = (x0, y0, x0 + w, y0 + h)
      classes[b, i] = rng.integers(1, 91)
      valid[b, i] = True
  return {
      "image": images, "gt_boxes": boxes, "gt_classes": classes, "gt_valid": valid,
      "gt_masks": np.where(valid[:, :, None, None], 1, 0).astype(np.uint8)
                  * np.ones((1, 1, mask_size, mask_size), np.uint8),
      "image_id": np.arange(batch, dtype=np.int32),
      "original_size": np.tile([height, width], (batch, 1)).astype(np.int32),
      "image_scale": np.ones((batch, 2), np.float32),
      "valid_size": np.tile([height, width], (batch, 1)).astype(np.int32),
      "example_valid": np.ones((batch,), bool),
  }
