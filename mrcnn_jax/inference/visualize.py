"""Prediction overlays: each instance's mask tinted in its own colour, its box, class and score.

Pure numpy + Pillow, host side. Colours come from matplotlib's ``tab20`` cycle so neighbouring
instances stay distinguishable; the label is drawn on a filled strip in the instance's colour so
it stays readable on any background.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab20 (RGB 0-255), inlined so drawing needs no matplotlib import at run time.
_PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], np.uint8)


def instance_colors(n: int) -> np.ndarray:
  """[n, 3] uint8 RGB, a distinct colour per instance (cycling after 20)."""
  return _PALETTE[np.arange(n) % len(_PALETTE)]


def _pairwise_iou(boxes: np.ndarray, masks: Optional[np.ndarray]) -> np.ndarray:
  """[N, N] IoU of the instances: of their masks when given, else of their boxes."""
  if masks is not None:
    flat = masks.reshape(masks.shape[0], -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
  else:
    x0, y0, x1, y1 = (boxes[:, None, k] for k in range(4))
    iw = np.clip(np.minimum(x1, x1.T) - np.maximum(x0, x0.T), 0, None)
    ih = np.clip(np.minimum(y1, y1.T) - np.maximum(y0, y0.T), 0, None)
    inter = iw * ih
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clip(0)
  union = area[:, None] + area[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def suppress_duplicates(boxes: np.ndarray, scores: np.ndarray,
                        masks: Optional[np.ndarray] = None,
                        iou_threshold: float = 0.7) -> np.ndarray:
  """Indices (best score first) of the instances to draw: each one overlapping a better-scored
  kept one by more than ``iou_threshold`` (mask IoU when ``masks`` [N, H, W] bool are given,
  else box IoU) is dropped, whatever the classes.

  Mask R-CNN suppresses duplicates per class only, so one object can come out twice under two
  classes (a circle as "circle 0.9" and "square 0.6"). Right for COCO scoring, which these
  pictures never feed; confusing in a picture, which should show one label per object.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  iou = _pairwise_iou(boxes, masks)
  keep = []
  for i in np.argsort(-np.asarray(scores, np.float32), kind="stable"):
    if all(iou[i, j] <= iou_threshold for j in keep):
      keep.append(int(i))
  return np.asarray(keep, np.int64)


def draw_instances(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                   labels: Sequence[str], masks: Optional[np.ndarray] = None, *,
                   alpha: float = 0.45,
                   duplicate_iou: Optional[float] = 0.7) -> np.ndarray:
  """Draws instances onto a copy of ``image``.

  Args:
    image: [H, W, 3] uint8 RGB.
    boxes: [N, 4] float xyxy pixels of ``image``.
    scores: [N] float.
    labels: N class names.
    masks: [N, H, W] bool (or probabilities, thresholded at 0.5), optional.
    alpha: mask tint opacity.
    duplicate_iou: draw one label per object: an instance overlapping a better-scored one by
      more than this (mask IoU, or box IoU without masks) is not drawn, whatever its class
      (:func:`suppress_duplicates`); None draws every instance.

  Returns:
    [H, W, 3] uint8 RGB with the overlay.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = boxes.shape[0]
  if len(scores) != n or len(labels) != n:
    raise ValueError(f"got {n} boxes, {len(scores)} scores and {len(labels)} labels")
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape != (n,) + image.shape[:2]:
      raise ValueError(f"masks must be [N, H, W] = {(n,) + image.shape[:2]}, got {masks.shape}")
    masks = masks > 0.5 if masks.dtype != bool else masks
  if duplicate_iou is not None and n > 1:
    keep = np.sort(suppress_duplicates(boxes, scores, masks, duplicate_iou))
    boxes, scores = boxes[keep], np.asarray(scores)[keep]
    labels = [labels[i] for i in keep]
    masks = None if masks is None else masks[keep]
    n = len(keep)
  colors = instance_colors(n)
  canvas = image.astype(np.float32)
  if masks is not None:
    # Lowest score first, so the most confident instance's tint ends on top.
    for i in np.argsort(scores):
      m = masks[i]
      canvas[m] = (1.0 - alpha) * canvas[m] + alpha * colors[i]
  out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  for i in range(n):
    color = tuple(int(c) for c in colors[i])
    x0, y0, x1, y1 = (float(v) for v in boxes[i])
    draw.rectangle([x0, y0, x1, y1], outline=color, width=max(1, round(min(image.shape[:2]) / 200)))
    text = f"{labels[i]} {float(scores[i]):.2f}"
    tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
    tw, th = tx1 - tx0, ty1 - ty0
    ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0  # above the box, or inside it at the top
    draw.rectangle([x0, ty, x0 + tw + 2, ty + th + 2], fill=color)
    draw.text((x0 + 1, ty + 1 - ty0), text, fill=(255, 255, 255), font=font)
  return np.asarray(out)


def upscale(image: np.ndarray, boxes: np.ndarray, masks: Optional[np.ndarray],
            factor: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
  """Nearest-neighbour ``factor``x enlargement of an image and its instances (for small images,
  whose labels would otherwise cover them)."""
  image = np.repeat(np.repeat(np.asarray(image), factor, 0), factor, 1)
  boxes = np.asarray(boxes, np.float32) * factor
  if masks is not None:
    masks = np.repeat(np.repeat(np.asarray(masks), factor, 1), factor, 2)
  return image, boxes, masks


def make_grid(images: Sequence[np.ndarray], cols: int = 4, pad: int = 4) -> np.ndarray:
  """Tiles [h_i, w_i, 3] uint8 images into one, row-major, on a white background."""
  if not images:
    raise ValueError("make_grid needs at least one image")
  rows = -(-len(images) // cols)
  cell_h = max(i.shape[0] for i in images) + pad
  cell_w = max(i.shape[1] for i in images) + pad
  grid = np.full((rows * cell_h + pad, min(cols, len(images)) * cell_w + pad, 3), 255, np.uint8)
  for k, image in enumerate(images):
    r, c = divmod(k, cols)
    y, x = pad + r * cell_h, pad + c * cell_w
    grid[y:y + image.shape[0], x:x + image.shape[1]] = image
  return grid


def save_png(image: np.ndarray, path: str) -> None:
  """Writes [H, W, 3] uint8 RGB as a PNG."""
  Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")
