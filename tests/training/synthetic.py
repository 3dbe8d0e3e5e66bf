"""Synthetic batches for the training tests: coloured rectangles and ellipses on a dark canvas.

Built here from the batch contract (notes/batch_api) with numpy alone, so the training tests do
not depend on the data pipeline. Class 1 = red rectangle, 2 = green ellipse, 3 = blue rectangle.
"""

from __future__ import annotations

import numpy as np

COLOURS = {1: (230, 40, 40), 2: (40, 220, 60), 3: (50, 70, 240)}


def _shape_mask(cls: int, box: np.ndarray, height: int, width: int) -> np.ndarray:
  """Full-image binary mask [H, W] of the object of class ``cls`` filling ``box`` (xyxy int)."""
  x0, y0, x1, y1 = box
  yy, xx = np.mgrid[0:height, 0:width]
  inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
  if cls == 2:  # ellipse inscribed in the box
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    rx, ry = max((x1 - x0) / 2, 1), max((y1 - y0) / 2, 1)
    inside &= ((xx - cx) / rx)**2 + ((yy - cy) / ry)**2 <= 1.0
  return inside


def _crop_resize(mask: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
  """The mask inside ``box`` resampled to [size, size] by nearest neighbour (pixel centres)."""
  x0, y0, x1, y1 = box
  ys = np.clip(np.floor(y0 + (np.arange(size) + 0.5) * (y1 - y0) / size), 0, mask.shape[0] - 1)
  xs = np.clip(np.floor(x0 + (np.arange(size) + 0.5) * (x1 - x0) / size), 0, mask.shape[1] - 1)
  return mask[ys.astype(int)[:, None], xs.astype(int)[None, :]]


def make_batch(rng: np.random.Generator, batch_size: int, image_size: tuple[int, int], *,
               max_instances: int, mask_size: int, num_objects: int = 2,
               min_size: int = 16) -> dict[str, np.ndarray]:
  """A batch per the batch contract with ``num_objects`` non-overlapping shapes per image.

  Returns:
    dict: ``image [B,H,W,3] uint8``, ``gt_boxes [B,G,4] float32 xyxy``, ``gt_classes [B,G]
    int32``, ``gt_masks [B,G,S,S] uint8``, ``gt_valid [B,G] bool`` and the metadata fields.
  """
  height, width = image_size
  g, s = max_instances, mask_size
  images = np.full((batch_size, height, width, 3), 20, np.uint8)
  boxes = np.zeros((batch_size, g, 4), np.float32)
  classes = np.zeros((batch_size, g), np.int32)
  masks = np.zeros((batch_size, g, s, s), np.uint8)
  valid = np.zeros((batch_size, g), bool)
  for b in range(batch_size):
    # Objects in separate vertical strips, so they never overlap.
    n = min(num_objects, g)
    strip = width // n
    for i in range(n):
      cls = int(rng.integers(1, 4))
      bw = int(rng.integers(min_size, max(min_size + 1, strip - 2)))
      bh = int(rng.integers(min_size, max(min_size + 1, height - 2)))
      x0 = i * strip + int(rng.integers(0, strip - bw + 1))
      y0 = int(rng.integers(0, height - bh + 1))
      box = np.array([x0, y0, x0 + bw, y0 + bh])
      full = _shape_mask(cls, box, height, width)
      images[b][full] = COLOURS[cls]
      boxes[b, i] = box
      classes[b, i] = cls
      masks[b, i] = _crop_resize(full, box, s)
      valid[b, i] = True
  return {
      "image": images,
      "gt_boxes": boxes,
      "gt_classes": classes,
      "gt_masks": masks,
      "gt_valid": valid,
      "image_id": np.arange(batch_size, dtype=np.int32),
      "original_size": np.tile(np.array([height, width], np.int32), (batch_size, 1)),
      "image_scale": np.ones((batch_size, 2), np.float32),
      "valid_size": np.tile(np.array([height, width], np.int32), (batch_size, 1)),
      "example_valid": np.ones((batch_size,), bool),
  }
