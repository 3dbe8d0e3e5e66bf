"""COCO evaluation: detections -> COCO results (boxes, pasted + RLE-encoded masks) -> COCOeval.

The model predicts at a static network-input size; COCO scores predictions in each image's
original coordinates, and original sizes differ from image to image. So the last step runs on the
host, per detection, in numpy: boxes are mapped back with the image's scale, and each 28x28 mask
probability map is pasted into the original image as torchvision's ``paste_masks_in_image`` does
(:func:`mrcnn_jax.inference.masks.paste_mask`, shared with the predictor), then thresholded and
RLE-encoded with pycocotools. Doing this inside ``jit`` would compile once per original image
size.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax.inference.masks import encode_mask
from mrcnn_jax.inference.masks import paste_mask

# The 12 numbers COCOeval.summarize() prints, in its order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)


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
