"""COCO evaluation: detections -> COCO results (boxes, pasted + RLE-encoded masks) -> COCOeval.

The model predicts at a static network-input size; COCO scores predictions in each image's
original coordinates, and original sizes differ from image to image. So the last step runs on the
host, per detection, in numpy: boxes are mapped back with the image's scale, and each 28x28 mask
probability map is pasted into the original image exactly as torchvision's
``paste_masks_in_image`` does (1-pixel zero padding, box expanded to match, bilinear resize with
``align_corners=False`` onto the integer box), then thresholded and RLE-encoded with pycocotools.
Doing this inside ``jit`` would compile once per original image size.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The 12 numbers COCOeval.summarize() prints, in its order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)


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


def detections_to_coco(
    detections: Mapping[str, np.ndarray],
    batch: Mapping[str, np.ndarray],
    class_to_category: Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
    with_masks: bool = True,
) -> list[dict]:
  """Turns one batch of fixed-size detections into COCO result records.

  Args:
    detections: the model's ``predict`` output for the batch, on the host: ``boxes`` [B, D, 4]
      xyxy pixels of the network input, ``scores`` [B, D], ``classes`` [B, D] int (1..K),
      ``masks`` [B, D, M, M] probabilities (optional when ``with_masks`` is False), ``valid`` [B, D].
    batch: the input batch's image info: ``image_id`` [B], ``original_size`` [B, 2] (h, w),
      ``image_scale`` [B, 2] (sy, sx), and optionally ``example_valid`` [B] (padding examples of a
      last eval batch are skipped).
    class_to_category: contiguous class id (1..K) -> COCO category id.
    mask_threshold: probability above which a pasted mask pixel is foreground.
    with_masks: also emit ``segmentation`` (RLE).

  Returns:
    A list of ``{"image_id", "category_id", "bbox" (xywh), "score"[, "segmentation"]}``.
  """
  boxes = np.asarray(detections["boxes"], np.float32)
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"detections['boxes'] must be [B, D, 4], got shape {boxes.shape}")
  scores = np.asarray(detections["scores"])
  classes = np.asarray(detections["classes"])
  valid = np.asarray(detections["valid"]).astype(bool)
  example_valid = np.asarray(batch.get("example_valid", np.ones(boxes.shape[0], bool)))
  results = []
  for b in range(boxes.shape[0]):
    if not example_valid[b]:
      continue
    image_id = int(batch["image_id"][b])
    orig_h, orig_w = (int(v) for v in batch["original_size"][b])
    sy, sx = (float(v) for v in batch["image_scale"][b])
    for d in np.flatnonzero(valid[b]):
      # Network-input pixels -> original pixels, clipped to the original image.
      box = boxes[b, d] / np.array([sx, sy, sx, sy], np.float32)
      box = np.clip(box, 0.0, np.array([orig_w, orig_h, orig_w, orig_h], np.float32))
      record = {
          "image_id": image_id,
          "category_id": int(class_to_category[int(classes[b, d])]),
          "bbox": [float(box[0]), float(box[1]),
                   float(box[2] - box[0]), float(box[3] - box[1])],
          "score": float(scores[b, d]),
      }
      if with_masks:
        pasted = paste_mask(detections["masks"][b, d], box, (orig_h, orig_w))
        record["segmentation"] = encode_mask(pasted > mask_threshold)
      results.append(record)
  return results


def evaluate_coco(
    coco_gt: COCO,
    results: Sequence[dict],
    iou_types: Iterable[str] = ("bbox", "segm"),
    image_ids: Optional[Sequence[int]] = None,
) -> dict:
  """Runs COCOeval and returns its numbers.

  Args:
    coco_gt: the ground truth, a ``pycocotools.coco.COCO``.
    results: COCO result records (see :func:`detections_to_coco`).
    iou_types: any of ``"bbox"``, ``"segm"``.
    image_ids: the images to score (default: all of ``coco_gt``'s). An image with no result
      still counts: its ground truth are misses.

  Returns:
    ``{iou_type: {"AP": ..., "AP50": ..., ... (the 12 standard numbers),
    "per_category": {category name: AP}, "summary": COCOeval's printed table}}``.
    With no results at all every number is 0.0.
  """
  image_ids = list(coco_gt.getImgIds() if image_ids is None else image_ids)
  metrics = {}
  for iou_type in iou_types:
    if iou_type not in ("bbox", "segm"):
      raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if not results:
      logging.warning("evaluate_coco: no detections at all; every %s number is 0", iou_type)
      metrics[iou_type] = dict({name: 0.0 for name in STAT_NAMES}, per_category={}, summary="")
      continue
    # Each pass sees only its own geometry. loadRes sets a result's ``area`` from ``bbox``
    # whenever one is present, and COCOeval uses that area to ignore unmatched detections
    # outside the small / medium / large ranges; mask AP must use the mask's area (as
    # detectron2 does, by dropping ``bbox`` before its segm pass), or APs/APm/APl are off.
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    records = [{k: v for k, v in r.items() if k != drop} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints; we log instead
      coco_dt = coco_gt.loadRes(list(records))
      evaluator = COCOeval(coco_gt, coco_dt, iou_type)
      evaluator.params.imgIds = image_ids
      evaluator.evaluate()
      evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      evaluator.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    stats["per_category"] = _per_category_ap(coco_gt, evaluator)
    stats["summary"] = summary.getvalue()
    metrics[iou_type] = stats
  return metrics


def _per_category_ap(coco_gt: COCO, evaluator: COCOeval) -> dict:
  """AP@[.5:.95] per category (area 'all', 100 detections), -1 where a category has no GT."""
  # precision: [T iou thresholds, R recall points, K categories, A areas, M max-dets]
  precision = evaluator.eval["precision"]
  per_category = {}
  for k, cat_id in enumerate(evaluator.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    name = coco_gt.cats[cat_id]["name"]
    per_category[name] = float(p.mean()) if p.size else -1.0
  return per_category


def format_metrics(metrics: Mapping[str, Mapping]) -> str:
  """A plain-text table of the 12 numbers per IoU type plus per-category AP."""
  lines = []
  for iou_type, stats in metrics.items():
    lines.append(f"{iou_type}: " + "  ".join(f"{n} {stats[n]:.3f}" for n in STAT_NAMES))
    for name, ap in sorted(stats.get("per_category", {}).items()):
      lines.append(f"  {iou_type} AP[{name}] = {ap:.3f}")
  return "\n".join(lines)
