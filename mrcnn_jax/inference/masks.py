"""Host-side mask post-processing shared by the predictor and COCO evaluation.

A predicted 28x28 mask probability map lives in its box's frame; images come in any size, so the
pasting runs on the host in numpy, per detection (inside ``jit`` it would compile once per
original image size), exactly as torchvision's ``paste_masks_in_image`` (1-pixel zero padding,
box expanded to match, bilinear resize with ``align_corners=False`` onto the integer box).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as mask_util

__all__ = ["encode_mask", "paste_mask"]


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] bilinear weights of ``F.interpolate(align_corners=False)``, one axis."""
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  src = np.maximum(src, 0.0)  # PyTorch clamps negative source coordinates to 0
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, i0), 1.0 - frac)
  np.add.at(weights, (rows, i1), frac)
  return weights


def paste_mask(mask: np.ndarray, box_xyxy: np.ndarray, image_size: Sequence[int]) -> np.ndarray:
  """Pastes one mask probability map into an image, as torchvision's ``paste_masks_in_image``.

  Args:
    mask: [M, M] float, probabilities in the box's frame.
    box_xyxy: [4] float, the box in pixels of the target image.
    image_size: (height, width) of the target image.

  Returns:
    [height, width] float32 probabilities, zero outside the (expanded) box.
  """
  mask = np.asarray(mask, np.float32)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"mask must be square [M, M], got shape {mask.shape}")
  im_h, im_w = int(image_size[0]), int(image_size[1])
  m = mask.shape[0]
  padded = np.pad(mask, 1)  # one pixel of zeros, so the pasted mask fades out at the box edge
  scale = (m + 2.0) / m
  box = np.asarray(box_xyxy, np.float32)
  half_w = (box[2] - box[0]) * 0.5 * scale
  half_h = (box[3] - box[1]) * 0.5 * scale
  cx = (box[2] + box[0]) * 0.5
  cy = (box[3] + box[1]) * 0.5
  # float32 arithmetic, then truncation toward zero, as torchvision's `.to(torch.int64)`.
  x0, y0 = int(np.float32(cx - half_w)), int(np.float32(cy - half_h))
  x1, y1 = int(np.float32(cx + half_w)), int(np.float32(cy + half_h))
  w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)

  out = np.zeros((im_h, im_w), np.float32)
  cx0, cx1 = max(x0, 0), min(x1 + 1, im_w)
  cy0, cy1 = max(y0, 0), min(y1 + 1, im_h)
  if cx0 >= cx1 or cy0 >= cy1:
    return out
  # Only the visible rows/columns of the resized mask are computed.
  ry = _resize_matrix(m + 2, h)[cy0 - y0:cy1 - y0]
  rx = _resize_matrix(m + 2, w)[cx0 - x0:cx1 - x0]
  out[cy0:cy1, cx0:cx1] = (ry @ padded.astype(np.float64) @ rx.T).astype(np.float32)
  return out


def encode_mask(binary_mask: np.ndarray) -> dict:
  """[H, W] bool -> COCO compressed RLE with a ``str`` counts field (JSON-serialisable)."""
  rle = mask_util.encode(np.asfortranarray(binary_mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle
