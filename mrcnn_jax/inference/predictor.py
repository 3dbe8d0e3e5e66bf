"""``Predictor``: any image in, instances in the image's own coordinates out.

The network runs at the config's static input size, so it compiles once: each image is scaled
(to fit ``config.data.image_size``, or by ``config.data.min_size`` / ``max_size``) with
torchvision's float bilinear resize (:func:`preprocess`), zero-padded, predicted, and the boxes,
28x28 masks and keypoints are mapped back to the original pixels (as torchvision's
``postprocess``: ``resize_boxes``, ``paste_masks_in_image``, ``resize_keypoints``).

    predictor = Predictor.from_workdir(config, "workdirs/shapes")
    result = predictor(image)                 # image: [h, w, 3] uint8 RGB
    result["boxes"], result["masks"]          # [N, 4] xyxy, [N, h, w] bool, original pixels
    result["keypoints"]                       # [N, K, 2] xy original pixels (keypoint models)

Batched (``batch_size`` images per call of the static program, the host's mask paste of one
batch overlapped with the device's work on the next):

    predictor = Predictor.from_workdir(config, "workdirs/shapes", batch_size=8)
    results = predictor.predict_batch(images)  # any number of images of any sizes
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Collection, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.data import transforms
from mrcnn_jax.data.coco import decode_image_rgb
from mrcnn_jax.inference import batch_predict
from mrcnn_jax.inference import visualize
from mrcnn_jax.inference.masks import encode_mask
from mrcnn_jax.inference.masks import paste_mask
from mrcnn_jax.run import checkpoint as ckpt_lib
from mrcnn_jax.run import paths as paths_lib

PyTree = Any


def load_image(path: str) -> np.ndarray:
  """[h, w, 3] uint8 RGB from any file Pillow reads (grayscale, RGBA, CMYK converted), turned
  as its EXIF orientation says (a phone photo comes out upright, as a viewer shows it; boxes
  and masks are in those pixels).

  Raises:
    OSError or ValueError: the file is missing or not a readable image.
  """
  image = decode_image_rgb(path, exif_transpose=True)
  if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f"{path}: not an RGB image (decoded shape {image.shape})")
  return image


def resized_size(h: int, w: int, image_size: Sequence[int], min_size: int = 0,
                 max_size: int = 0) -> Tuple[int, int]:
  """(rh, rw) the predictor scales an h x w image to, before padding to ``image_size``.

  With ``min_size`` > 0 torchvision's rule (``GeneralizedRCNNTransform``, which calls
  ``interpolate(scale_factor=s, recompute_scale_factor=True)``): s = min(min_size / min(h, w),
  max_size / max(h, w)) in float64, sizes floor(h * s), floor(w * s) (480 x 640 at 800 / 1333
  -> 800 x 1066; Detectron2 and the tf.data pipeline round instead). With 0, 0 the evaluation
  pipeline's fit, min(H / h, W / w) in float32, rounded half to even, at most (H, W).
  """
  if min_size:
    scale = min(min_size / min(h, w), max_size / max(h, w))
    rh, rw = math.floor(h * scale), math.floor(w * scale)
  else:
    fh, fw = np.float32(h), np.float32(w)
    scale = min(np.float32(image_size[0]) / fh, np.float32(image_size[1]) / fw)
    rh, rw = int(np.round(fh * scale)), int(np.round(fw * scale))
  return (min(max(rh, 1), int(image_size[0])), min(max(rw, 1), int(image_size[1])))


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """float32 a * b + c rounded once (the product is exact in float64), as a fused
  multiply-add: torch's x86-64 CPU kernels are compiled with contraction into FMAs."""
  return (np.asarray(a, np.float64) * b + c).astype(np.float32)


def _linear_taps(in_size: int, out_size: int):
  """Source rows (or columns) and weights of torch's bilinear resize along one axis
  (``align_corners=False``, CPU, float32): src = in/out * (i + 0.5) - 0.5, clamped at 0."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = _fma(np.full(out_size, scale, np.float32),
             np.arange(out_size, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """[h, w, C] -> [rh, rw, C] float32, bit for bit torch's CPU ``interpolate(mode='bilinear',
  align_corners=False)`` (what torchvision's detection transform does to the float image):
  same taps and weights, each row interpolated along x, then the two rows along y."""
  x = np.asarray(image, np.float32)
  y0, y1, wy0, wy1 = _linear_taps(x.shape[0], size[0])
  x0, x1, wx0, wx1 = _linear_taps(x.shape[1], size[1])
  wx0, wx1 = wx0[None, :, None], wx1[None, :, None]
  top, bottom = x[y0], x[y1]
  top = _fma(top[:, x0], wx0, top[:, x1] * wx1)
  bottom = _fma(bottom[:, x0], wx0, bottom[:, x1] * wx1)
  return _fma(top, wy0[:, None, None], bottom * wy1[:, None, None])


def preprocess(image: np.ndarray, image_size: Sequence[int], min_size: int = 0,
               max_size: int = 0) -> dict:
  """Scales an image as torchvision's detection transform does and pads it to ``image_size``.

  The scaled image is torchvision's float bilinear resample of the original pixels, not
  rounded, so converted torchvision weights see torchvision's input (up to the float rounding
  of normalising before vs after the resize, both affine). An image at scale 1 is its own
  pixels. Training and evaluation keep the tf.data pipeline's uint8 resize
  (``mrcnn_jax.data.transforms``), whose size rule rounds where this one floors.

  Args:
    image: [h, w, 3] uint8 RGB.
    image_size: (H, W) of the network input.
    min_size, max_size: 0, 0 scales the image to fit ``image_size``; else its shorter side to
      ``min_size``, its longer at most ``max_size`` (``config.data``; :func:`resized_size`).

  Returns:
    ``{'image': [H, W, 3] float32 in 0..255, zero-padded, 'valid_size': [2] int32 (rh, rw),
    'image_scale': [2] float32 (sy, sx) = (rh / h, rw / w), 'original_size': [2] int32}``.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be [h, w, 3] uint8, got shape {image.shape} {image.dtype}")
  transforms.check_resize(image_size, min_size, max_size)
  h, w = image.shape[:2]
  rh, rw = resized_size(h, w, image_size, min_size, max_size)
  out = np.zeros(tuple(int(v) for v in image_size) + (3,), np.float32)
  out[:rh, :rw] = image if (rh, rw) == (h, w) else resize_bilinear(image, (rh, rw))
  return {"image": out, "valid_size": np.array([rh, rw], np.int32),
          "image_scale": np.array([rh, rw], np.float32) / np.array([h, w], np.float32),
          "original_size": np.array([h, w], np.int32)}


class Predictor:
  """Runs a trained Mask R-CNN on images of any size, one at a time or in static batches.

  Args:
    config: the full experiment config (``model``, ``data.image_size``).
    variables: the model variables (``{'params': ...}`` [+ ``'batch_stats'``]); kept as
      ``self.variables`` with, on CPU, the Winograd kernel transforms added
      (``kernels.prepare_inference``).
    class_names: name of each contiguous class 1..K (index 0 = class 1); default ``class_k``.
    category_ids: COCO category id of each contiguous class (for COCO-results JSON); default
      1..K.
    score_threshold: detections below this score are dropped.
    mask_threshold: pasted mask probability above which a pixel is foreground.
    batch_size: images per call of the compiled program in :meth:`predict_batch` /
      :meth:`predict_iter` (:meth:`predict` always runs a batch of 1).
    skeletons: for a keypoint model, class name -> skeleton (1-based keypoint pairs, COCO's
      ``skeleton``) of each class with keypoints: overlays join its keypoints, and only its
      COCO results carry ``keypoints``; None: every class has keypoints, drawn as dots only.
    keypoint_threshold: overlays draw keypoints scoring above this (their heatmap logit);
      default ``config.eval.keypoint_draw_threshold``.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: PyTree, *,
               class_names: Optional[Sequence[str]] = None,
               category_ids: Optional[Sequence[int]] = None,
               score_threshold: float = 0.5, mask_threshold: float = 0.5,
               batch_size: int = 1,
               skeletons: Optional[Mapping[str, visualize.Skeleton]] = None,
               keypoint_threshold: Optional[float] = None):
    self.batch_size = batch_predict.check_batch_size(batch_size)
    self.config = config
    self.image_size = tuple(int(v) for v in config.data.image_size)
    self.resize = (int(config.data.get("min_size", 0)), int(config.data.get("max_size", 0)))
    transforms.check_resize(self.image_size, *self.resize)  # a bad config fails here
    num_fg = int(config.model.num_classes) - 1
    self.class_names = list(class_names) if class_names else [f"class_{k}" for k in
                                                              range(1, num_fg + 1)]
    self.category_ids = list(category_ids) if category_ids else list(range(1, num_fg + 1))
    self.score_threshold = float(score_threshold)
    self.mask_threshold = float(mask_threshold)
    self.skeletons = None if skeletons is None else dict(skeletons)
    if keypoint_threshold is None:
      keypoint_threshold = (config.get("eval") or {}).get("keypoint_draw_threshold",
                                                          visualize.KEYPOINT_THRESHOLD)
    self.keypoint_threshold = float(keypoint_threshold)
    model = modeling.MaskRCNN(config.model, kernels=kernels.select(config.kernels))
    # With the CPU kernels: Winograd kernel transforms computed once, XLA:CPU's Eigen dots.
    self.variables = kernels.prepare_inference(model, variables, self.image_size)
    self._predict = kernels.jit_predict(model)

  @classmethod
  def from_workdir(cls, config: ml_collections.ConfigDict, path: str, **kwargs) -> "Predictor":
    """Loads the parameters of a run: its workdir, ``checkpoints/`` folder or one step folder.

    Class names, category ids and skeletons come from ``config.data.eval_annotations`` when
    it exists.
    """
    ckpt_lib.check_checkpoint_model(config, path)  # parameters load by name, not by meaning
    flat = ckpt_lib.load_params(path)
    variables = {"params": flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(v) for k, v in flat.items()}, sep="/")}
    stats = ckpt_lib.load_collection(path, "batch_stats")
    if stats:
      variables["batch_stats"] = stats
    if "class_names" not in kwargs:
      names, ids, skeletons = _categories_from_config(config)
      if names:
        kwargs.setdefault("class_names", names)
        kwargs.setdefault("category_ids", ids)
        kwargs.setdefault("skeletons", skeletons)
    return cls(config, variables, **kwargs)

  def __call__(self, image: np.ndarray) -> dict:
    return self.predict(image)

  def predict(self, image: np.ndarray) -> dict:
    """Instances of one image.

    Args:
      image: [h, w, 3] uint8 RGB, any size.

    Returns:
      ``boxes`` [N, 4] float32 xyxy original pixels, ``scores`` [N], ``classes`` [N] int32
      (1..K), ``labels`` N class names, ``category_ids`` [N], ``masks`` [N, h, w] bool (with
      the mask branch), ``keypoints`` [N, K, 2] float32 xy original pixels and
      ``keypoint_scores`` [N, K] float32 (with the keypoint branch); best first, scores >=
      ``score_threshold``.
    """
    pre = preprocess(image, self.image_size, *self.resize)
    # Always float32 (an unresized image exactly its pixels): one compiled program.
    out = self._predict(self.variables, pre["image"][None], pre["valid_size"][None])
    return self._postprocess(jax.device_get(out), 0, pre)

  def predict_batch(self, images: Iterable[np.ndarray], overlap: bool = True) -> list[dict]:
    """:meth:`predict`'s results for each image, ``batch_size`` images per program call.

    Each image is preprocessed exactly as :meth:`predict` does (same static input size) and
    letterboxed into a slot of the static batch; the last batch is filled with padding slots
    whose outputs are dropped. An image's result does not depend on its slot, its neighbours or
    the padding, so it is bit for bit what predicting it alone at this ``batch_size`` gives;
    against :meth:`predict` (a batch-1 program) XLA may round floats differently (last bits).

    Args:
      images: [h, w, 3] uint8 RGB arrays of any sizes, any number.
      overlap: paste the masks of one batch on the host while the next one runs on the device.

    Returns:
      One :meth:`predict` dict per image, in order.
    """
    return list(self.predict_iter(images, overlap=overlap))

  def predict_iter(self, images: Iterable[np.ndarray], overlap: bool = True) -> Iterator[dict]:
    """:meth:`predict_batch` as a generator: images are read lazily, one batch ahead.

    With ``overlap`` batch k + 1 is preprocessed and dispatched (JAX dispatch returns at once)
    before batch k's detections are fetched and pasted, and before the caller's work on the
    results of batch k (RLE, overlays) runs, so host and device work at the same time.
    """
    pending = collections.deque()  # (preprocessed images, device outputs) in flight
    for chunk in batch_predict.chunks(images, self.batch_size):
      pres = [preprocess(image, self.image_size, *self.resize) for image in chunk]
      batch = batch_predict.stack_padded([p["image"] for p in pres],
                                         [p["valid_size"] for p in pres], self.batch_size)
      pending.append((pres, self._predict(self.variables, *batch)))
      if len(pending) > int(overlap):  # without overlap: wait for this batch before the next
        yield from self._postprocess_batch(*pending.popleft())
    while pending:
      yield from self._postprocess_batch(*pending.popleft())

  def _postprocess_batch(self, pres: Sequence[dict], out: dict) -> Iterator[dict]:
    """The results of a batch's real slots (the first ``len(pres)``; padding is dropped)."""
    det = jax.device_get(out)  # waits for this batch only; the next keeps running
    for i, pre in enumerate(pres):
      yield self._postprocess(det, i, pre)

  def _postprocess(self, det: Mapping[str, np.ndarray], i: int, pre: Mapping[str, Any]) -> dict:
    """Slot ``i`` of host detections as a :meth:`predict` result, in original pixels."""
    h, w = (int(v) for v in pre["original_size"])
    # torchvision's resize_boxes: boxes times original / resized size, in float32.
    ry, rx = pre["original_size"].astype(np.float32) / pre["valid_size"].astype(np.float32)
    keep = np.flatnonzero(det["valid"][i] & (det["scores"][i] >= self.score_threshold))
    boxes = det["boxes"][i, keep] * np.array([rx, ry, rx, ry], np.float32)
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], np.float32)).astype(np.float32)
    classes = det["classes"][i, keep].astype(np.int32)
    result = {"boxes": boxes, "scores": det["scores"][i, keep].astype(np.float32),
              "classes": classes, "labels": [self.class_names[c - 1] for c in classes],
              "category_ids": np.asarray([self.category_ids[c - 1] for c in classes], np.int64)}
    if "masks" in det:
      masks = np.zeros((len(keep), h, w), bool)
      for j, d in enumerate(keep):
        masks[j] = paste_mask(det["masks"][i, d], boxes[j], (h, w),
                              aligned=self.config.model.mask.aligned) > self.mask_threshold
      result["masks"] = masks
    if "keypoints" in det:
      # torchvision's resize_keypoints: the boxes' scale, not clipped.
      result["keypoints"] = (det["keypoints"][i, keep] * np.array([rx, ry], np.float32)
                             ).astype(np.float32)
      result["keypoint_scores"] = det["keypoint_scores"][i, keep].astype(np.float32)
    return result

  def draw(self, image: np.ndarray, result: Mapping[str, Any]) -> np.ndarray:
    """The overlay of one :meth:`predict` result on its image: masks and keypoints (above
    ``keypoint_threshold``, joined by ``skeletons``) when the result has them."""
    keypoints = {}
    if "keypoints" in result:
      keypoints = dict(keypoints=result["keypoints"], keypoint_scores=result["keypoint_scores"],
                       skeletons=self.skeletons, keypoint_threshold=self.keypoint_threshold)
    return visualize.draw_instances(image, result["boxes"], result["scores"], result["labels"],
                                    result.get("masks"), **keypoints)


def to_coco_results(result: Mapping[str, Any], image_id: int,
                    file_name: Optional[str] = None,
                    keypoint_labels: Optional[Collection[str]] = None) -> list[dict]:
  """One image's :meth:`Predictor.predict` output as COCO result records (bbox xywh; RLE
  ``segmentation`` when it has masks; ``keypoints`` [x1, y1, s1, ...] when it has keypoints,
  s = the keypoint's score, for the classes named in ``keypoint_labels``, default all)."""
  records = []
  for i in range(len(result["scores"])):
    x0, y0, x1, y1 = (float(v) for v in result["boxes"][i])
    record = {"image_id": int(image_id), "category_id": int(result["category_ids"][i]),
              "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(result["scores"][i])}
    if "masks" in result:
      record["segmentation"] = encode_mask(result["masks"][i])
    if "keypoints" in result and (keypoint_labels is None
                                  or result["labels"][i] in keypoint_labels):
      record["keypoints"] = np.concatenate(
          [result["keypoints"][i], result["keypoint_scores"][i][:, None]],
          axis=1).reshape(-1).astype(float).tolist()
    if file_name is not None:
      record["file_name"] = file_name
    records.append(record)
  return records


def _categories_from_config(config: ml_collections.ConfigDict):
  """(names, category ids, skeletons of the categories with keypoints or None if none has) from
  the eval annotations JSON (local or ``gs://``), or ``(None, None, None)``."""
  key = "eval_annotations" if config.data.get("eval_annotations") else "train_annotations"
  path = config.data.get(key)
  if not path:
    return None, None, None
  with paths_lib.one_line_errors(f"config.data.{key}", path):
    if not epath.Path(path).exists():
      return None, None, None
    cats = json.loads(epath.Path(path).read_text()).get("categories", [])
  cats = sorted(cats, key=lambda c: int(c["id"]))
  return ([str(c.get("name", c["id"])) for c in cats], [int(c["id"]) for c in cats],
          visualize.skeletons_from_categories(cats) or None)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_file(path: str) -> bool:
  """A glob match that is a file. In a bucket a match named like an image is taken as one
  without asking (one request per image otherwise); folders there are object-name prefixes."""
  if paths_lib.is_url(path):
    return _is_image_name(path) or not tf.io.gfile.isdir(path)
  return epath.Path(path).is_file()


def expand_image_paths(spec: str) -> list[str]:
  """A file, a folder (its image files, sorted) or a glob pattern -> sorted list of paths,
  local or ``gs://`` (``gs://bucket/photos/*.jpg``).

  Raises:
    FileNotFoundError: nothing matches, or the bucket does not exist.
    PermissionError: the bucket refuses access.
  """
  spec = str(spec) if paths_lib.is_url(spec) else os.path.expanduser(spec)
  with paths_lib.one_line_errors("--images", spec):
    paths_lib.check_bucket("--images", spec)
    if epath.Path(spec).is_dir():
      # A bucket lists its sub-folders as "name/": never taken for an image.
      paths = [paths_lib.join(spec, n) for n in sorted(tf.io.gfile.listdir(spec))
               if _is_image_name(n)]
    elif epath.Path(spec).is_file():
      paths = [spec]
    else:
      # As the shell (and Python's glob): a pattern not starting with "." skips hidden files.
      hidden_ok = epath.Path(spec).name.startswith(".")
      paths = sorted(p for p in tf.io.gfile.glob(spec)
                     if (hidden_ok or not epath.Path(p).name.startswith(".")) and _is_file(p))
  if not paths:
    raise FileNotFoundError(f"no image found at {spec!r}")
  return paths


RESULTS_FILE = "results.json"


def _overlay_name(index: int, file_name: str) -> str:
  return f"{index:04d}_{epath.Path(file_name).stem}.png"


def previous_outputs(out_dir: str) -> list[str]:
  """The files a previous :func:`predict_files` run left in ``out_dir``: its ``results.json``
  (written first, so even an interrupted run has one) and the overlays it names. Nothing else
  in the folder is listed."""
  results = paths_lib.join(out_dir, RESULTS_FILE)
  if not epath.Path(results).is_file():
    return []
  try:
    names = json.loads(epath.Path(results).read_text()).get("images", [])
  except (OSError, ValueError, AttributeError):  # not a results file of ours: overlays unknown
    names = []
  overlays = [paths_lib.join(out_dir, _overlay_name(i, n)) for i, n in enumerate(names)
              if isinstance(n, str)]
  return [results] + [p for p in overlays if epath.Path(p).is_file()]


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
  """Refuses an output folder (local or ``gs://``) holding another run's results, unless
  ``overwrite``.

  Raises:
    ValueError: ``out_dir`` is a file, or holds a ``results.json`` and ``overwrite`` is off.
    FileNotFoundError, PermissionError: its bucket does not exist or refuses access.
  """
  with paths_lib.one_line_errors("--out", out_dir):
    paths_lib.check_bucket("--out", out_dir)
    if epath.Path(out_dir).exists() and not epath.Path(out_dir).is_dir():
      raise ValueError(f"--out {out_dir!r} is a file, not a folder")
    previous = previous_outputs(out_dir)
  if previous and not overwrite:
    n = len(previous) - 1
    raise ValueError(
        f"--out {out_dir!r} holds another run's results ({RESULTS_FILE} and {n} "
        f"overlay{'' if n == 1 else 's'}); pick another folder or pass --overwrite to replace them")


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str, *,
                  overwrite: bool = False) -> dict:
  """Predicts each image file, writing overlays and one COCO-results JSON to ``out_dir``.

  Images go through :meth:`Predictor.predict_iter` (``predictor.batch_size`` per program call,
  the overlays of one batch drawn while the next runs). Unreadable files are skipped and
  listed, never fatal to the run. A folder holding another run's results is refused
  (:func:`check_out_dir`); with ``overwrite`` that run's ``results.json`` and overlays (only
  those) are deleted first, so no stale overlay remains.

  Returns:
    ``{'results': path of results.json, 'overlays': [png paths], 'failed': [(path, reason)],
    'num_instances': int}``. ``results.json`` holds the COCO result records (``image_id`` =
    the file's index in ``paths``, plus its ``file_name``; :func:`to_coco_results`), the list
    of failures, and ``complete`` (false while the run is under way).
  """
  check_out_dir(out_dir, overwrite)
  results_path = paths_lib.join(out_dir, RESULTS_FILE)
  names = [epath.Path(p).name for p in paths]

  def write_results(records, failed, complete):
    epath.Path(results_path).write_text(json.dumps(
        {"detections": records, "images": names,
         "failed": [{"path": p, "reason": r} for p, r in failed], "complete": complete}))

  with paths_lib.one_line_errors("--out", out_dir):  # a read-only bucket fails here, not later
    for path in previous_outputs(out_dir):
      epath.Path(path).unlink()
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    # Written first: a run stopped half-way still names the overlays it wrote, for the next one.
    write_results([], [], complete=False)
  records, overlays, failed = [], [], []
  keypoint_labels = None if predictor.skeletons is None else set(predictor.skeletons)
  readable = collections.deque()  # (index, path, image) fed to the predictor, not yet returned

  def images():
    for index, path in enumerate(paths):
      try:
        image = load_image(path)
      # Pillow refuses images over ~179 M pixels with DecompressionBombError, not an OSError.
      # A bucket's read errors are TensorFlow's (tf.errors), not OSErrors.
      except (OSError, ValueError, Image.DecompressionBombError, tf.errors.OpError) as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        logging.warning("skipping unreadable image %s (%s)", path, reason)
        failed.append((path, reason))
        continue
      readable.append((index, path, image))
      yield image

  # Results come in the order images went in; overlays are drawn while the next batch runs.
  for result in predictor.predict_iter(images()):
    index, path, image = readable.popleft()
    records += to_coco_results(result, index, file_name=names[index],
                               keypoint_labels=keypoint_labels)
    drawn = predictor.draw(image, result)
    png = paths_lib.join(out_dir, _overlay_name(index, path))
    visualize.save_png(drawn, png)
    overlays.append(png)
  write_results(records, failed, complete=True)
  return {"results": results_path, "overlays": overlays, "failed": failed,
          "num_instances": len(records)}
