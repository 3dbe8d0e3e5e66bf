"""Prediction overlays: each instance's mask tinted in its own colour, its box, class and score,
and its keypoints (dots) joined by its category's skeleton.

Pure numpy + Pillow, host side. Colours come from matplotlib's ``tab20`` cycle so neighbouring
instances stay distinguishable; the label is drawn on a filled strip in the instance's colour so
it stays readable on any background.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab20 (RGB 0-255), inlined so drawing needs no matplotlib import at run time.
_PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], np.uint8)


# A keypoint is drawn when its score (the heatmap logit at its peak) is above this: Detectron's
# kp_thresh, on the same score.
KEYPOINT_THRESHOLD = 2.0
Skeleton = Sequence[Tuple[int, int]]


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


def skeletons_from_categories(categories: Sequence[Mapping]) -> dict:
  """Category name -> skeleton (1-based keypoint index pairs) of each COCO category entry that
  has keypoints (a non-empty ``keypoints`` list; ``skeleton`` may be absent: no lines)."""
  return {str(c.get("name", c.get("id"))): [(int(a), int(b)) for a, b in c.get("skeleton") or []]
          for c in categories if c.get("keypoints")}


def draw_instances(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                   labels: Sequence[str], masks: Optional[np.ndarray] = None, *,
                   alpha: float = 0.45,
                   duplicate_iou: Optional[float] = 0.7,
                   keypoints: Optional[np.ndarray] = None,
                   keypoint_scores: Optional[np.ndarray] = None,
                   skeletons: Optional[Mapping[str, Skeleton]] = None,
                   keypoint_threshold: float = KEYPOINT_THRESHOLD) -> np.ndarray:
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
    keypoints: [N, K, 2] float xy pixels of ``image`` (pixel (i, j) covers x in [j, j + 1),
      y in [i, i + 1)), optional: each drawn as a dot in the instance's colour, ringed in white.
    keypoint_scores: [N, K]: only keypoints scoring above ``keypoint_threshold`` are drawn
      (default: all).
    skeletons: class name -> 1-based keypoint pairs joined by lines in the instance's colour
      (COCO's ``skeleton``; :func:`skeletons_from_categories`) where both ends are drawn;
      classes not in it get dots only.
    keypoint_threshold: see ``keypoint_scores``; default Detectron's 2 (on the heatmap logit).

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
  if keypoints is not None:
    keypoints = np.asarray(keypoints, np.float32)
    if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[-1] != 2:
      raise ValueError(f"keypoints must be [N, K, 2] with N = {n}, got {keypoints.shape}")
    keypoint_scores = (np.full(keypoints.shape[:2], np.inf, np.float32)
                       if keypoint_scores is None else np.asarray(keypoint_scores, np.float32))
    if keypoint_scores.shape != keypoints.shape[:2]:
      raise ValueError(f"keypoint_scores must be [N, K] = {keypoints.shape[:2]}, got "
                       f"{keypoint_scores.shape}")
  if duplicate_iou is not None and n > 1:
    keep = np.sort(suppress_duplicates(boxes, scores, masks, duplicate_iou))
    boxes, scores = boxes[keep], np.asarray(scores)[keep]
    labels = [labels[i] for i in keep]
    masks = None if masks is None else masks[keep]
    if keypoints is not None:
      keypoints, keypoint_scores = keypoints[keep], keypoint_scores[keep]
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
  if keypoints is not None:
    _draw_keypoints(draw, image.shape[:2], keypoints, keypoint_scores > keypoint_threshold,
                    [dict(skeletons or {}).get(label, ()) for label in labels], colors,
                    np.asarray(scores, np.float32))
  return np.asarray(out)


def _draw_keypoints(draw: ImageDraw.ImageDraw, hw: Tuple[int, int], keypoints: np.ndarray,
                    shown: np.ndarray, skeletons: Sequence[Skeleton], colors: np.ndarray,
                    scores: np.ndarray) -> None:
  """Skeleton lines, then dots, of each instance (lowest score first: the best ends on top).

  A keypoint at continuous (x, y) is in pixel (floor(y), floor(x)); dots are centred on that
  pixel, which keeps the instance's exact colour.
  """
  shown = shown & np.isfinite(keypoints).all(axis=-1)
  radius = max(1, round(min(hw) / 160))
  width = max(1, round(min(hw) / 200))
  for i in np.argsort(scores, kind="stable"):
    color = tuple(int(c) for c in colors[i])
    k = keypoints.shape[1]
    # Far-off points (a diverged model) are clamped so Pillow gets sane integers.
    xy = [(int(math.floor(np.clip(x, -hw[1], 2 * hw[1]))),
           int(math.floor(np.clip(y, -hw[0], 2 * hw[0])))) for x, y in keypoints[i]]
    for a, b in skeletons[i]:
      if 1 <= a <= k and 1 <= b <= k and shown[i, a - 1] and shown[i, b - 1]:
        draw.line([xy[a - 1], xy[b - 1]], fill=color, width=width)
    for j in np.flatnonzero(shown[i]):
      x, y = xy[j]
      draw.ellipse([x - radius - 1, y - radius - 1, x + radius + 1, y + radius + 1],
                   fill=(255, 255, 255))
      draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)


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
  """Writes [H, W, 3] uint8 RGB as a PNG (``path`` local or ``gs://``)."""
  with epath.Path(path).open("wb") as f:
    Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG")
