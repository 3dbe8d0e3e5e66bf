"""COCO evaluation: detections -> COCO results (boxes, pasted + RLE-encoded masks, keypoints)
-> COCOeval (``bbox``, ``segm`` and ``keypoints``, OKS).

The model predicts at a static network-input size; COCO scores predictions in each image's
original coordinates, and original sizes differ from image to image. So the last step runs on the
host, per detection, in numpy: boxes and keypoints are mapped back with the image's scale, and
each 28x28 mask probability map is pasted into the original image as torchvision's
``paste_masks_in_image`` does (:func:`mrcnn_jax.inference.masks.paste_mask`, shared with the
predictor), then thresholded and RLE-encoded with pycocotools. Doing this inside ``jit`` would
compile once per original image size.

Keypoint AP is pycocotools' OKS AP with one sigma per keypoint (``kpt_oks_sigmas``). Each
category with keypoints is scored by its own ``COCOeval`` with its own sigmas, and the
per-category precision / recall tables are joined before ``summarize``, so the numbers are those
of one joint COCOeval (the mean over categories) while categories may differ in sigmas and K.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Collection, Iterable, Mapping, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pycocotools.cocoeval import Params

from mrcnn_jax.inference.masks import encode_mask
from mrcnn_jax.inference.masks import paste_mask

# The 12 numbers COCOeval.summarize() prints for 'bbox' and 'segm', in its order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
# The 10 it prints for 'keypoints' (20 detections per image; no small range: OKS needs an area).
KEYPOINT_STAT_NAMES = (
    "AP", "AP50", "AP75", "APm", "APl",
    "AR", "AR50", "AR75", "ARm", "ARl",
)
IOU_TYPES = ("bbox", "segm", "keypoints")
# The result field each pass scores; the others are dropped from its records (see evaluate_coco).
_GEOMETRY = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}

Sigmas = Sequence[float]


def stat_names(iou_type: str) -> tuple:
  """The names of the numbers :func:`evaluate_coco` returns for ``iou_type``, in COCO's order."""
  if iou_type not in IOU_TYPES:
    raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
  return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES


def oks_sigmas_by_category(
    categories: Sequence[Mapping],
    sigmas: Optional[Sigmas] = None,
    per_category: Optional[Mapping[str, Sigmas]] = None,
) -> dict:
  """The OKS sigmas of each ground-truth category that has keypoints.

  Args:
    categories: the ground truth's ``categories`` entries; a category has keypoints when its
      ``keypoints`` (the K keypoint names) is a non-empty list.
    sigmas: K sigmas for every keypoint category not in ``per_category``; default
      pycocotools' (COCO's 17 person keypoints).
    per_category: category name -> its own K sigmas.

  Returns:
    ``{category id: [K] float64 sigmas}``, in category id order.

  Raises:
    ValueError: no category has keypoints; a category's sigma count is not its keypoint count;
      a sigma is not positive; ``per_category`` names a category without keypoints.
  """
  with_keypoints = sorted((c for c in categories if c.get("keypoints")), key=lambda c: c["id"])
  if not with_keypoints:
    raise ValueError(
        "keypoint evaluation needs a person_keypoints-style ground truth, but no category of "
        f"it lists 'keypoints' (categories: {[c.get('name', c.get('id')) for c in categories]})")
  default = Params(iouType="keypoints").kpt_oks_sigmas if sigmas is None else sigmas
  per_category = dict(per_category or {})
  unknown = sorted(set(per_category) - {str(c.get("name")) for c in with_keypoints})
  if unknown:
    raise ValueError(f"eval.keypoint_oks_sigmas_per_category names {unknown}, not categories "
                     f"with keypoints {[c.get('name') for c in with_keypoints]}")
  out = {}
  for c in with_keypoints:
    name = str(c.get("name"))
    field = ("eval.keypoint_oks_sigmas_per_category" + f"[{name!r}]" if name in per_category
             else "eval.keypoint_oks_sigmas")
    s = np.asarray(per_category.get(name, default), np.float64).reshape(-1)
    k = len(c["keypoints"])
    if s.size != k:
      raise ValueError(f"{field} has {s.size} sigmas but category {name!r} has {k} keypoints "
                       f"({', '.join(map(str, c['keypoints']))}): give one sigma per keypoint")
    if not np.all(s > 0):
      raise ValueError(f"{field} must be positive, got {s.tolist()}")
    out[int(c["id"])] = s
  return out


def detections_to_coco(
    detections: Mapping[str, np.ndarray],
    batch: Mapping[str, np.ndarray],
    class_to_category: Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
    mask_aligned: bool = False,
    with_masks: bool = True,
    with_keypoints: bool = False,
    keypoint_category_ids: Optional[Collection[int]] = None,
) -> list[dict]:
  """Turns one batch of fixed-size detections into COCO result records.

  Args:
    detections: the model's ``predict`` output for the batch, on the host: ``boxes`` [B, D, 4]
      xyxy pixels of the network input, ``scores`` [B, D], ``classes`` [B, D] int (1..K),
      ``masks`` [B, D, M, M] probabilities (needed when ``with_masks``), ``keypoints``
      [B, D, K, 2] xy network-input pixels and ``keypoint_scores`` [B, D, K] (needed when
      ``with_keypoints``), ``valid`` [B, D].
    batch: the input batch's image info: ``image_id`` [B], ``original_size`` [B, 2] (h, w),
      ``image_scale`` [B, 2] (sy, sx), and optionally ``example_valid`` [B] (padding examples of a
      last eval batch are skipped).
    class_to_category: contiguous class id (1..K) -> COCO category id.
    mask_threshold: probability above which a pasted mask pixel is foreground.
    mask_aligned: the model's ``mask.aligned``: paste half-pixel exactly at the float box
      (``paste_mask(aligned=True)``) instead of torchvision's way.
    with_masks: also emit ``segmentation`` (RLE).
    with_keypoints: also emit ``keypoints`` [x1, y1, s1, ..., xK, yK, sK]: original-image
      pixels, scaled back as the boxes are (not clipped, as torchvision's ``resize_keypoints``),
      and s = the keypoint's score (its heatmap logit, as detectron2 writes; pycocotools reads
      only x and y).
    keypoint_category_ids: the COCO categories whose detections get ``keypoints`` (those of
      the ground truth with keypoints); None: all.

  Returns:
    A list of ``{"image_id", "category_id", "bbox" (xywh), "score"[, "segmentation"]
    [, "keypoints"]}``.
  """
  boxes = np.asarray(detections["boxes"], np.float32)
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"detections['boxes'] must be [B, D, 4], got shape {boxes.shape}")
  needs = ((with_masks, ("masks",)), (with_keypoints, ("keypoints", "keypoint_scores")))
  for wanted, keys in needs:
    missing = [k for k in keys if wanted and k not in detections]
    if missing:
      raise ValueError(f"COCO results with {' and '.join(keys)} need the predictions' "
                       f"{missing}, but the model predicts only {sorted(detections)} (is its "
                       f"{'mask' if keys[0] == 'masks' else 'keypoint'} branch enabled?)")
  if with_keypoints:
    keypoints = np.asarray(detections["keypoints"], np.float32)
    keypoint_scores = np.asarray(detections["keypoint_scores"], np.float32)
    if keypoints.shape[:2] != boxes.shape[:2] or keypoints.ndim != 4 or keypoints.shape[-1] != 2:
      raise ValueError(f"detections['keypoints'] must be [B, D, K, 2] with [B, D] = "
                       f"{boxes.shape[:2]}, got shape {keypoints.shape}")
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
        pasted = paste_mask(detections["masks"][b, d], box, (orig_h, orig_w),
                            aligned=mask_aligned)
        record["segmentation"] = encode_mask(pasted > mask_threshold)
      if with_keypoints and (keypoint_category_ids is None
                             or record["category_id"] in keypoint_category_ids):
        xy = keypoints[b, d] / np.array([sx, sy], np.float32)
        record["keypoints"] = np.concatenate(
            [xy, keypoint_scores[b, d, :, None]], axis=1).reshape(-1).astype(float).tolist()
      results.append(record)
  return results


def evaluate_coco(
    coco_gt: COCO,
    results: Sequence[dict],
    iou_types: Iterable[str] = ("bbox", "segm"),
    image_ids: Optional[Sequence[int]] = None,
    *,
    keypoint_oks_sigmas: Optional[Sigmas] = None,
    keypoint_oks_sigmas_per_category: Optional[Mapping[str, Sigmas]] = None,
) -> dict:
  """Runs COCOeval and returns its numbers.

  Args:
    coco_gt: the ground truth, a ``pycocotools.coco.COCO``.
    results: COCO result records (see :func:`detections_to_coco`).
    iou_types: any of ``"bbox"``, ``"segm"``, ``"keypoints"``.
    image_ids: the images to score (default: all of ``coco_gt``'s). An image with no result
      still counts: its ground truth are misses.
    keypoint_oks_sigmas, keypoint_oks_sigmas_per_category: the OKS sigmas of the keypoint
      categories (:func:`oks_sigmas_by_category`; default COCO's 17 person sigmas).

  Returns:
    ``{iou_type: {"AP": ..., "AP50": ..., ... (:func:`stat_names`: the 12 standard numbers, 10
    for keypoints), "per_category": {category name: AP}, "summary": COCOeval's printed table}}``.
    With no results at all every number is 0.0.

  Raises:
    ValueError: an unknown iou type; ``"keypoints"`` against a ground truth without keypoints
      or with sigmas that do not fit it (:func:`oks_sigmas_by_category`); results without the
      field an iou type scores.
  """
  image_ids = list(coco_gt.getImgIds() if image_ids is None else image_ids)
  iou_types = tuple(iou_types)
  for iou_type in iou_types:
    stat_names(iou_type)  # raises on an unknown one
  sigmas = None
  if "keypoints" in iou_types:  # a wrong ground truth or sigma count fails before any work
    sigmas = oks_sigmas_by_category(coco_gt.dataset.get("categories", []),
                                    keypoint_oks_sigmas, keypoint_oks_sigmas_per_category)
  metrics = {}
  for iou_type in iou_types:
    field = _GEOMETRY[iou_type]
    # Each pass sees only its own geometry. loadRes sets a result's ``area`` from ``bbox``
    # whenever one is present, and COCOeval uses that area to ignore unmatched detections
    # outside the small / medium / large ranges; mask AP must use the mask's area (as
    # detectron2 does, by dropping ``bbox`` before its segm pass), or APs/APm/APl are off.
    # Keypoint results get theirs from the keypoints' extent, as torchvision's (box-less)
    # keypoint results do.
    others = set(_GEOMETRY.values()) - {field}
    records = [{k: v for k, v in r.items() if k not in others} for r in results
               if iou_type != "keypoints" or r["category_id"] in sigmas]
    lacking = sum(field not in r for r in records)
    if lacking:
      raise ValueError(f"{lacking} of {len(records)} results have no {field!r}: scoring "
                       f"{iou_type!r} needs it in every result"
                       + (" of a category with keypoints" if iou_type == "keypoints" else ""))
    if not records:
      logging.warning("evaluate_coco: no detections at all; every %s number is 0", iou_type)
      metrics[iou_type] = dict({name: 0.0 for name in stat_names(iou_type)}, per_category={},
                               summary="")
      continue
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints; we log instead
      if iou_type == "keypoints":
        evaluator = _evaluate_keypoints(coco_gt, records, image_ids, sigmas)
      else:
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(records), iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      evaluator.summarize()
    stats = {name: float(v) for name, v in zip(stat_names(iou_type), evaluator.stats)}
    stats["per_category"] = _per_category_ap(coco_gt, evaluator)
    stats["summary"] = summary.getvalue()
    metrics[iou_type] = stats
  return metrics


def _evaluate_keypoints(coco_gt: COCO, records: list, image_ids: Sequence[int],
                        sigmas: Mapping[int, np.ndarray]) -> COCOeval:
  """OKS evaluation, one ``COCOeval`` per keypoint category (its own sigmas), joined into one
  accumulated ``COCOeval`` over all of them, ready to ``summarize``.

  COCOeval scores each category on its own (``evaluateImg`` per image and category,
  ``accumulate`` fills one precision / recall column per category), so the joined tables are
  exactly those of a single run over the categories, and every number a mean over categories.
  """
  coco_gt = _complete_keypoint_ground_truth(coco_gt, sigmas)
  for r in records:
    k = sigmas[r["category_id"]].size
    if len(r["keypoints"]) != 3 * k:
      raise ValueError(f"a result of category {r['category_id']} has {len(r['keypoints'])} "
                       f"keypoint numbers; its ground truth has {k} keypoints ({3 * k} numbers)")
  coco_dt = coco_gt.loadRes(records)
  runs = []
  for cat_id, cat_sigmas in sigmas.items():
    run = COCOeval(coco_gt, coco_dt, "keypoints")
    run.params.imgIds = list(image_ids)
    run.params.catIds = [cat_id]
    run.params.kpt_oks_sigmas = cat_sigmas
    run.evaluate()
    run.accumulate()
    runs.append(run)
  joined = copy.copy(runs[0])
  joined.params = copy.copy(runs[0].params)
  joined.params.catIds = list(sigmas)
  # precision / scores: [T, R, K, A, M]; recall: [T, K, A, M] (K: the categories).
  joined.eval = dict(
      runs[0].eval,
      counts=runs[0].eval["counts"][:2] + [len(runs)] + runs[0].eval["counts"][3:],
      precision=np.concatenate([r.eval["precision"] for r in runs], axis=2),
      recall=np.concatenate([r.eval["recall"] for r in runs], axis=1),
      scores=np.concatenate([r.eval["scores"] for r in runs], axis=2))
  return joined


def _complete_keypoint_ground_truth(coco_gt: COCO, sigmas: Mapping[int, np.ndarray]) -> COCO:
  """``coco_gt``, or a copy whose keypoint-category annotations all carry ``keypoints`` and
  ``num_keypoints`` (COCOeval reads both of every such annotation): one without keypoints (a
  crowd region, say) gets K zeros, ignored like COCO's own crowd entries, and a missing
  ``num_keypoints`` is its count of labelled (v > 0) keypoints."""
  anns = coco_gt.dataset.get("annotations", [])
  for a in anns:
    if a.get("category_id") in sigmas and a.get("keypoints"):
      k = sigmas[a["category_id"]].size
      if len(a["keypoints"]) != 3 * k:
        raise ValueError(f"ground-truth annotation {a.get('id')} has {len(a['keypoints'])} "
                         f"keypoint numbers; its category has {k} keypoints ({3 * k} numbers)")
  if all("keypoints" in a and "num_keypoints" in a for a in anns
         if a.get("category_id") in sigmas):
    return coco_gt
  completed = []
  for a in anns:
    if a.get("category_id") in sigmas:
      kp = list(a.get("keypoints") or [0] * (3 * sigmas[a["category_id"]].size))
      a = dict(a, keypoints=kp, num_keypoints=a.get(
          "num_keypoints", int(np.count_nonzero(np.asarray(kp[2::3]) > 0))))
    completed.append(a)
  out = COCO()
  out.dataset = dict(coco_gt.dataset, annotations=completed)
  with contextlib.redirect_stdout(io.StringIO()):
    out.createIndex()
  return out


def _per_category_ap(coco_gt: COCO, evaluator: COCOeval) -> dict:
  """AP@[.5:.95] per category (area 'all', most detections), -1 where a category has no GT."""
  # precision: [T iou thresholds, R recall points, K categories, A areas, M max-dets]
  precision = evaluator.eval["precision"]
  per_category = {}
  for k, cat_id in enumerate(evaluator.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    name = coco_gt.cats[cat_id]["name"]
    per_category[name] = float(p.mean()) if p.size else -1.0
  return per_category


def summary_scalars(metrics: Mapping[str, Mapping]) -> dict:
  """``{"<iou_type>/<AP name>": value}`` of the AP numbers of each iou type in ``metrics``
  (``bbox/AP`` ... ``bbox/APl``, ``keypoints/AP`` ... ``keypoints/APl``), for TensorBoard."""
  return {f"{iou_type}/{name}": float(metrics[iou_type][name])
          for iou_type in IOU_TYPES if iou_type in metrics
          for name in stat_names(iou_type) if name.startswith("AP")}


def format_metrics(metrics: Mapping[str, Mapping]) -> str:
  """A plain-text table of the COCO numbers per IoU type plus per-category AP."""
  lines = []
  for iou_type, stats in metrics.items():
    lines.append(f"{iou_type}: " + "  ".join(f"{n} {stats[n]:.3f}"
                                             for n in stat_names(iou_type)))
    for name, ap in sorted(stats.get("per_category", {}).items()):
      lines.append(f"  {iou_type} AP[{name}] = {ap:.3f}")
  return "\n".join(lines)
