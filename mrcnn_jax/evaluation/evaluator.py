"""COCO evaluation of a model over a whole split: jitted inference, host post-processing, COCOeval.

The evaluator is given a batched predict function
(:func:`mrcnn_jax.inference.batch_predict.make_batch_predict`), not a model or a trainer. The
device runs it on fixed-size batches (sharded over the mesh); the host maps
each detection back to its original image, pastes and RLE-encodes its mask
(:func:`mrcnn_jax.evaluation.coco_eval.detections_to_coco`) and finally runs pycocotools. The
host work of batch ``i`` overlaps the device work of batch ``i + 1`` (the next batch is
dispatched before the host blocks on the current one), so mask pasting hides behind inference
unless it is the slower of the two; the report says which share of the wall time it took.

The ground truth is what the loader accepted (:meth:`~mrcnn_jax.data.coco.CocoSource.ground_truth`):
annotations it refused are not scored, and an image it could not read (missing or corrupt file)
leaves COCOeval's ``imgIds``, so a broken file costs no AP. Both are reported in the log line
and under ``'data'`` of the returned metrics and the metrics JSON ("evaluated N of M images;
K annotations refused: ...").

With several processes each host post-processes its own images; the COCO records, the ids of
the images each host evaluated and each host's load failures are gathered to every host before
COCOeval, so every process returns the same numbers.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import pickle
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from jax.sharding import Mesh
from pycocotools.coco import COCO
from tqdm import tqdm

from mrcnn_jax import data as data_lib
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.evaluation import coco_eval
from mrcnn_jax.inference import batch_predict
from mrcnn_jax.inference import visualize
from mrcnn_jax.inference.masks import paste_mask
from mrcnn_jax.run import checkpoint as ckpt_lib
from mrcnn_jax.run import checks
from mrcnn_jax.run import distributed
from mrcnn_jax.run import paths
from mrcnn_jax.run import sharding as sharding_lib

PyTree = Any
# predict(variables, images [B, H, W, 3] uint8, valid_size [B, 2] int32) -> detections dict.
PredictFn = Callable[[PyTree, jax.Array, jax.Array], Mapping[str, jax.Array]]


def check_iou_types(config: ml_collections.ConfigDict) -> None:
  """``config.eval.iou_types`` are known and the model predicts what they score.

  Raises:
    ValueError: an unknown iou type, ``'segm'`` without the mask branch or ``'keypoints'``
      without the keypoint branch.
  """
  iou_types = tuple(config.eval.iou_types)
  unknown = [t for t in iou_types if t not in coco_eval.IOU_TYPES]
  if unknown:
    raise ValueError(f"config.eval.iou_types has {unknown}; known: {coco_eval.IOU_TYPES}")
  branches = {"segm": ("mask", True), "keypoints": ("keypoint", False)}
  for iou_type, (branch, default) in branches.items():
    section = config.model.get(branch) or {}
    if iou_type in iou_types and not section.get("enabled", default):
      raise ValueError(f"config.eval.iou_types has {iou_type!r} but config.model.{branch}."
                       f"enabled is False: the model predicts no {branch}s to score")


def coco_from_dataset(dataset: Mapping) -> COCO:
  """A ``pycocotools.coco.COCO`` from an already parsed instances JSON (no file re-read)."""
  coco = COCO()
  coco.dataset = dict(dataset)
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def host_local(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in batch order, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # replicas of one shard (other mesh axes) appear once
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)


def _allgather_records(records: list) -> list:
  """Every process's list (of picklable items), concatenated in process order (a no-op on one
  process)."""
  if jax.process_count() == 1:
    return records
  payload = np.frombuffer(pickle.dumps(records), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([payload.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:payload.size] = payload
  everything = multihost_utils.process_allgather(padded)
  out = []
  for size, row in zip(np.asarray(sizes).reshape(-1), everything):
    out += pickle.loads(row[:int(size)].tobytes())
  return out


class Evaluator:
  """Runs COCO evaluation of one predict function on one mesh; it compiles once.

  Args:
    config: the full config (reads ``eval``; ``model`` for which branches there are).
    predict_fn: ``predict(variables, images, valid_size) -> detections`` over global,
      batch-sharded arrays (``boxes`` [B, N, 4] xyxy network-input pixels, ``scores``,
      ``classes``, ``valid``; ``masks`` [B, N, M, M] with the mask branch, ``keypoints``
      [B, N, K, 2] xy network-input pixels and ``keypoint_scores`` [B, N, K] with the keypoint
      branch), e.g. :func:`~mrcnn_jax.inference.batch_predict.make_batch_predict`.
    mesh: the mesh whose ``'data'`` axis splits eval batches.
  """

  def __init__(self, config: ml_collections.ConfigDict, predict_fn: Optional[PredictFn],
               mesh: Mesh):
    check_iou_types(config)
    self.config = config
    self.mesh = mesh
    self._predict = predict_fn
    self._compiled = None

  def predict_batch(self, variables: PyTree, host_batch: Mapping[str, np.ndarray]) -> dict:
    """Dispatches ``predict`` on this host's batch; returns global device arrays (not fetched)."""
    batch = sharding_lib.make_global_batch(
        {k: host_batch[k] for k in ("image", "valid_size")}, self.mesh)
    args = (variables, batch["image"], batch["valid_size"])
    if self._compiled is None:  # all processes start predicting together (a no-op on one)
      self._compiled = distributed.compile_together(self._predict, *args, name="predict")
    return self._compiled(*args)

  def evaluate(self, variables: PyTree, dataset, *, workdir: Optional[str] = None,
               step: Optional[int] = None, progress: bool = True,
               num_images_to_draw: int = 0) -> dict:
    """Predicts every image of ``dataset`` and scores the predictions with COCOeval.

    Args:
      variables: the model's variables (``{'params': ...}``), replicated over the mesh.
      dataset: an eval :class:`~mrcnn_jax.data.pipeline.InputPipeline` (finite, padded last
        batch with ``example_valid``); its ``source.dataset`` is the COCO ground truth.
      workdir: if given, process 0 writes ``<workdir>/eval/metrics_<step>.json`` (numbers,
        timings) and ``detections_<step>.json`` (COCO results).
      step: the training step, for file names and the record.
      progress: show a tqdm bar (process 0).
      num_images_to_draw: also return this many overlays (first images of this host).

    Returns:
      ``{'bbox': {...}, 'segm': {...}, 'keypoints': {...}`` (those of ``eval.iou_types``: the
      numbers of :func:`coco_eval.stat_names` + ``per_category`` each, see
      :func:`coco_eval.evaluate_coco`), ``'data'``: what was scored (:func:`data_report`),
      ``'timing': {...}``, ``'images'``: list of [H, W, 3] uint8 overlays}``.

    Raises:
      ValueError: ``'keypoints'`` is asked for and the ground truth has no keypoints, or
        ``eval.keypoint_oks_sigmas`` does not fit them (before anything is predicted).
    """
    if dataset.source is None:
      raise ValueError("evaluation needs a COCO-JSON eval source (config.data.source='coco')")
    ec = self.config.eval
    categories = dataset.categories
    class_to_category = {i + 1: cid for i, cid in enumerate(categories.category_ids)}
    iou_types = tuple(ec.iou_types)
    with_masks = "segm" in iou_types
    with_keypoints = "keypoints" in iou_types
    gt_categories = dataset.source.dataset.get("categories", [])
    sigmas, keypoint_category_ids = {}, None
    if with_keypoints:  # a ground truth without keypoints or a wrong sigma count fails now
      sigmas = dict(keypoint_oks_sigmas=tuple(ec.keypoint_oks_sigmas),
                    keypoint_oks_sigmas_per_category=dict(ec.keypoint_oks_sigmas_per_category))
      keypoint_category_ids = set(coco_eval.oks_sigmas_by_category(gt_categories,
                                                                   *sigmas.values()))

    records, drawn, evaluated_ids = [], [], []
    t_start = time.perf_counter()
    t_post = t_wait = 0.0
    num_images = 0
    first = {}  # when the first batch was done (its time includes compiling predict)
    bar = None
    if progress and jax.process_index() == 0:
      bar = tqdm(total=dataset.num_batches, desc="eval", unit="batch", leave=False)

    def finish(pending):
      nonlocal t_post, t_wait, num_images
      host_batch, out = pending
      t0 = time.perf_counter()
      det = {k: host_local(v) for k, v in out.items()}
      t1 = time.perf_counter()
      records.extend(coco_eval.detections_to_coco(
          det, host_batch, class_to_category, mask_threshold=ec.mask_threshold,
          mask_aligned=bool(self.config.model.mask.aligned), with_masks=with_masks,
          with_keypoints=with_keypoints,
          keypoint_category_ids=keypoint_category_ids))
      t2 = time.perf_counter()
      t_wait += t1 - t0
      t_post += t2 - t1
      num_images += int(np.sum(host_batch["example_valid"]))
      evaluated_ids.extend(int(i) for i in
                           np.asarray(host_batch["image_id"])[host_batch["example_valid"]])
      if not first:
        first.update(t=time.perf_counter(), images=num_images)
      if len(drawn) < num_images_to_draw:
        drawn.extend(self._draw(host_batch, det, categories, gt_categories,
                                num_images_to_draw - len(drawn)))
      if bar is not None:
        bar.update(1)

    pending = None
    for host_batch in dataset:
      # Dispatched before the previous batch's host work: the device runs while the host pastes.
      out = self.predict_batch(variables, host_batch)
      if pending is not None:
        finish(pending)
      pending = (host_batch, out)
    if pending is not None:
      finish(pending)
    if bar is not None:
      bar.close()
    t_infer_loop = time.perf_counter() - t_start

    records = _allgather_records(records)
    evaluated = set(_allgather_records(evaluated_ids))
    load_failures = dict(_allgather_records(sorted(dataset.source.load_failures.items())))
    num_images = len(evaluated)
    t0 = time.perf_counter()
    source = dataset.source
    coco_gt = coco_from_dataset(source.ground_truth())
    # Images that failed to load have no predictions; scoring their ground truth would count
    # every object in them as missed.
    image_ids = [r.image_id for r in source.records if r.image_id in evaluated]
    metrics = coco_eval.evaluate_coco(coco_gt, records, iou_types=iou_types, image_ids=image_ids,
                                      **sigmas)
    t_cocoeval = time.perf_counter() - t0
    data = data_report(source, evaluated, load_failures)
    total = time.perf_counter() - t_start
    t_end_loop = t_start + t_infer_loop
    steady_images = num_images - first.get("images", 0)
    timing = {
        "num_images": num_images,
        # Throughput after the first batch, whose time includes compiling predict; with a
        # single batch, over the whole loop.
        "images_per_second": (steady_images / max(t_end_loop - first["t"], 1e-9)
                              if steady_images > 0 and jax.process_count() == 1
                              else num_images / max(t_infer_loop, 1e-9)),
        "first_batch_seconds": first.get("t", t_end_loop) - t_start,
        "inference_loop_seconds": t_infer_loop,
        "postprocess_seconds": t_post,
        "device_wait_seconds": t_wait,
        "cocoeval_seconds": t_cocoeval,
        "total_seconds": total,
        # The host's mask pasting / RLE encoding as a share of the inference loop's wall time.
        "postprocess_share": t_post / max(t_infer_loop, 1e-9),
    }
    metrics["data"] = data
    metrics["timing"] = timing
    log = logging.warning if data["images_skipped"] or data["annotations_refused"] else logging.info
    log("eval: %s", data["summary"])
    logging.info("eval: %d images, %.1f images/s, post-processing %.0f%% of the loop, "
                 "COCOeval %.1fs", num_images, timing["images_per_second"],
                 100 * timing["postprocess_share"], t_cocoeval)
    if workdir is not None and jax.process_index() == 0:
      save_results(workdir, metrics, records, step)
    metrics["images"] = drawn
    return metrics

  def _draw(self, host_batch, det, categories, gt_categories, limit: int) -> list:
    """Overlays of the first ``limit`` valid images of a batch, drawn on the network input
    (masks and keypoints when the model predicts them; skeletons from the GT categories)."""
    out = []
    ec = self.config.eval
    thr = float(ec.draw_score_threshold)
    skeletons = visualize.skeletons_from_categories(gt_categories)
    for b in range(host_batch["image"].shape[0]):
      if len(out) >= limit:
        break
      if not host_batch["example_valid"][b]:
        continue
      vh, vw = (int(v) for v in host_batch["valid_size"][b])
      image = host_batch["image"][b, :vh, :vw]
      keep = np.flatnonzero(det["valid"][b] & (det["scores"][b] >= thr))
      boxes = det["boxes"][b, keep]
      masks = None
      if "masks" in det:
        aligned = self.config.model.mask.aligned
        masks = np.zeros((0, vh, vw), np.float32)
        if keep.size:
          masks = np.stack([paste_mask(det["masks"][b, d], det["boxes"][b, d], (vh, vw),
                                       aligned=aligned) for d in keep])
        masks = masks > 0.5
      keypoints = {}
      if "keypoints" in det:
        keypoints = dict(keypoints=det["keypoints"][b, keep],
                         keypoint_scores=det["keypoint_scores"][b, keep], skeletons=skeletons,
                         keypoint_threshold=float(ec.keypoint_draw_threshold))
      labels = [categories.names[int(c) - 1] for c in det["classes"][b, keep]]
      out.append(visualize.draw_instances(image, boxes, det["scores"][b, keep], labels, masks,
                                          **keypoints))
    return out


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str,
                        workdir: Optional[str] = None, *, progress: bool = True) -> dict:
  """Loads a checkpoint (workdir, ``checkpoints/`` folder, step folder or weights file) and
  evaluates it on ``config.data``'s eval split; results JSON go to ``<workdir>/eval``.

  Paths may be local or ``gs://``; a missing one, a missing bucket or a refused permission is
  one line before anything compiles.
  """
  checks.check_data_paths(config, train=False, evaluate=True)
  paths.check_exists("checkpoint", checkpoint)
  if workdir is not None and jax.process_index() == 0:
    paths.check_writable_dir("workdir", workdir)
  ckpt_lib.check_checkpoint_model(config, checkpoint)
  variables, step = ckpt_lib.load_variables(checkpoint)
  mesh = sharding_lib.make_run_mesh(config)
  variables = jax.device_put(variables, sharding_lib.replicated(mesh))
  dataset = data_lib.build_eval_dataset(config)
  checks.check_num_classes(config, dataset.categories)
  model = modeling.MaskRCNN(config.model, kernels=kernels.select(config.kernels, mesh=mesh),
                            mesh=mesh)
  evaluator = Evaluator(config, batch_predict.make_batch_predict(model, mesh), mesh)
  metrics = evaluator.evaluate(variables, dataset, workdir=workdir, step=step, progress=progress)
  metrics.pop("images", None)
  return metrics


def _reasons(counts: Mapping[str, int]) -> str:
  return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))


def data_report(source, evaluated: set, load_failures: Mapping[int, str]) -> dict:
  """What an evaluation scored, against what the JSON lists.

  Args:
    source: the eval :class:`~mrcnn_jax.data.coco.CocoSource`.
    evaluated: ids of the images that were predicted (all processes).
    load_failures: image id -> why its load failed (all processes).

  Returns:
    ``{'images_listed': M, 'images_evaluated': N, 'images_skipped': {reason: count},
    'annotations_refused': {reason: count}, 'summary': "evaluated N of M images (skipped: ...);
    K annotations refused: ..."}``.
  """
  listed = len(source.dataset.get("images", []))
  skipped = collections.Counter(source.dropped_images)
  for r in source.records:
    if r.image_id not in evaluated:
      skipped[load_failures.get(r.image_id, "not_loaded")] += 1
  refused = dict(source.refused_annotations)
  k = sum(refused.values())
  summary = f"evaluated {len(evaluated)} of {listed} images"
  summary += f" (skipped: {_reasons(skipped)})" if skipped else ""
  summary += f"; {k} annotation{'' if k == 1 else 's'} refused"
  summary += f": {_reasons(refused)}" if refused else ""
  return {"images_listed": listed, "images_evaluated": len(evaluated),
          "images_skipped": dict(skipped), "annotations_refused": refused, "summary": summary}


def save_results(workdir: str, metrics: Mapping, records: Iterable[dict],
                 step: Optional[int]) -> str:
  """Writes ``<workdir>/eval/metrics_<step>.json`` and ``detections_<step>.json`` (local or
  ``gs://``); returns the metrics path."""
  out_dir = paths.join(workdir, "eval")
  tag = "final" if step is None else f"{int(step):08d}"
  serialisable = {k: v for k, v in metrics.items() if k != "images"}
  serialisable["step"] = None if step is None else int(step)
  path = paths.join(out_dir, f"metrics_{tag}.json")
  with paths.one_line_errors("eval results folder", out_dir):
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(json.dumps(serialisable, indent=2))
    epath.Path(paths.join(out_dir, f"detections_{tag}.json")).write_text(
        json.dumps(list(records)))
  return path
