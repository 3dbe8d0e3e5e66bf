"""``Predictor``: any image in, instances in the image's own coordinates out.

The network runs at the config's static input size, so it compiles once: each image is scaled
(to fit ``config.data.image_size``, or by ``config.data.min_size`` / ``max_size``) and
zero-padded exactly as the evaluation pipeline does (the same TensorFlow transform), predicted,
and the boxes and 28x28 masks are mapped back to the original pixels (masks pasted as
torchvision's ``paste_masks_in_image``).

    predictor = Predictor.from_workdir(config, "workdirs/shapes")
    result = predictor(image)                 # image: [h, w, 3] uint8 RGB
    result["boxes"], result["masks"]          # [N, 4] xyxy, [N, h, w] bool, original pixels
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping, Optional, Sequence

from absl import logging
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
from mrcnn_jax.inference import visualize
from mrcnn_jax.inference.masks import encode_mask
from mrcnn_jax.inference.masks import paste_mask
from mrcnn_jax.run import checkpoint as ckpt_lib

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


def preprocess(image: np.ndarray, image_size: Sequence[int], min_size: int = 0,
               max_size: int = 0) -> dict:
  """Scales an image and pads it to ``image_size``, as the evaluation pipeline does.

  Args:
    image: [h, w, 3] uint8 RGB.
    image_size: (H, W) of the network input.
    min_size, max_size: 0, 0 scales the image to fit ``image_size``; else its shorter side to
      ``min_size``, its longer at most ``max_size`` (``config.data``; see
      ``mrcnn_jax.data.transforms``).

  Returns:
    ``{'image': [H, W, 3] uint8, 'valid_size': [2] int32, 'image_scale': [2] float32 (sy, sx),
    'original_size': [2] int32}``.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be [h, w, 3] uint8, got shape {image.shape} {image.dtype}")
  h, w = image.shape[:2]
  raw = {"image": tf.constant(image), "boxes": tf.zeros([0, 4], tf.float32),
         "classes": tf.zeros([0], tf.int32), "masks": tf.zeros([0, h, w], tf.uint8),
         "image_id": tf.constant(0, tf.int32), "ok": tf.constant(True)}
  out = transforms.transform_example(
      raw, tf.zeros([2], tf.int64), image_size=tuple(int(v) for v in image_size),
      max_instances=1, mask_size=1, training=False, min_size=int(min_size),
      max_size=int(max_size))
  return {k: out[k].numpy() for k in ("image", "valid_size", "image_scale", "original_size")}


class Predictor:
  """Runs a trained Mask R-CNN on single images of any size.

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
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: PyTree, *,
               class_names: Optional[Sequence[str]] = None,
               category_ids: Optional[Sequence[int]] = None,
               score_threshold: float = 0.5, mask_threshold: float = 0.5):
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
    model = modeling.MaskRCNN(config.model, kernels=kernels.select(config.kernels))
    # With the CPU kernels: Winograd kernel transforms computed once, XLA:CPU's Eigen dots.
    self.variables = kernels.prepare_inference(model, variables, self.image_size)
    self._predict = kernels.jit_predict(model)

  @classmethod
  def from_workdir(cls, config: ml_collections.ConfigDict, path: str, **kwargs) -> "Predictor":
    """Loads the parameters of a run: its workdir, ``checkpoints/`` folder or one step folder.

    Class names and category ids come from ``config.data.eval_annotations`` when it exists.
    """
    ckpt_lib.check_checkpoint_model(config, path)  # parameters load by name, not by meaning
    flat = ckpt_lib.load_params(path)
    variables = {"params": flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(v) for k, v in flat.items()}, sep="/")}
    stats = ckpt_lib.load_collection(path, "batch_stats")
    if stats:
      variables["batch_stats"] = stats
    if "class_names" not in kwargs:
      names, ids = _categories_from_config(config)
      if names:
        kwargs.setdefault("class_names", names)
        kwargs.setdefault("category_ids", ids)
    return cls(config, variables, **kwargs)

  def __call__(self, image: np.ndarray) -> dict:
    return self.predict(image)

  def predict(self, image: np.ndarray) -> dict:
    """Instances of one image.

    Args:
      image: [h, w, 3] uint8 RGB, any size.

    Returns:
      ``boxes`` [N, 4] float32 xyxy original pixels, ``scores`` [N], ``classes`` [N] int32
      (1..K), ``labels`` N class names, ``category_ids`` [N], ``masks`` [N, h, w] bool;
      best first, scores >= ``score_threshold``.
    """
    pre = preprocess(image, self.image_size, *self.resize)
    out = self._predict(self.variables, pre["image"][None], pre["valid_size"][None])
    det = jax.device_get(out)
    h, w = (int(v) for v in pre["original_size"])
    sy, sx = (float(v) for v in pre["image_scale"])
    keep = np.flatnonzero(det["valid"][0] & (det["scores"][0] >= self.score_threshold))
    boxes = det["boxes"][0, keep] / np.array([sx, sy, sx, sy], np.float32)
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], np.float32)).astype(np.float32)
    masks = np.zeros((len(keep), h, w), bool)
    for i, d in enumerate(keep):
      masks[i] = paste_mask(det["masks"][0, d], boxes[i], (h, w)) > self.mask_threshold
    classes = det["classes"][0, keep].astype(np.int32)
    return {"boxes": boxes, "scores": det["scores"][0, keep].astype(np.float32),
            "classes": classes, "labels": [self.class_names[c - 1] for c in classes],
            "category_ids": np.asarray([self.category_ids[c - 1] for c in classes], np.int64),
            "masks": masks}


def to_coco_results(result: Mapping[str, Any], image_id: int,
                    file_name: Optional[str] = None) -> list[dict]:
  """One image's :meth:`Predictor.predict` output as COCO result records (bbox xywh, RLE)."""
  records = []
  for i in range(len(result["scores"])):
    x0, y0, x1, y1 = (float(v) for v in result["boxes"][i])
    record = {"image_id": int(image_id), "category_id": int(result["category_ids"][i]),
              "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(result["scores"][i]),
              "segmentation": encode_mask(result["masks"][i])}
    if file_name is not None:
      record["file_name"] = file_name
    records.append(record)
  return records


def _categories_from_config(config: ml_collections.ConfigDict):
  """(names, category ids) from the eval annotations JSON, or ``(None, None)``."""
  path = config.data.get("eval_annotations") or config.data.get("train_annotations")
  if not path or not os.path.exists(path):
    return None, None
  with open(path) as f:
    cats = sorted(json.load(f).get("categories", []), key=lambda c: int(c["id"]))
  return [str(c.get("name", c["id"])) for c in cats], [int(c["id"]) for c in cats]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def expand_image_paths(spec: str) -> list[str]:
  """A file, a folder (its image files, sorted) or a glob pattern -> sorted list of paths.

  Raises:
    FileNotFoundError: nothing matches.
  """
  spec = os.path.expanduser(spec)
  if os.path.isdir(spec):
    paths = [os.path.join(spec, n) for n in sorted(os.listdir(spec))
             if n.lower().endswith(IMAGE_EXTENSIONS)]
  elif os.path.isfile(spec):
    paths = [spec]
  else:
    paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"no image found at {spec!r}")
  return paths


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str) -> dict:
  """Predicts each image file, writing overlays and one COCO-results JSON to ``out_dir``.

  Unreadable files are skipped and listed, never fatal to the batch.

  Returns:
    ``{'results': path of results.json, 'overlays': [png paths], 'failed': [(path, reason)],
    'num_instances': int}``. ``results.json`` holds the COCO result records (``image_id`` =
    the file's index in ``paths``, plus its ``file_name``) and the list of failures.
  """
  os.makedirs(out_dir, exist_ok=True)
  records, overlays, failed = [], [], []
  for index, path in enumerate(paths):
    try:
      image = load_image(path)
    # Pillow refuses images over ~179 M pixels with DecompressionBombError, not an OSError.
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      reason = f"{type(e).__name__}: {e}".splitlines()[0]
      logging.warning("skipping unreadable image %s (%s)", path, reason)
      failed.append((path, reason))
      continue
    result = predictor.predict(image)
    records += to_coco_results(result, index, file_name=os.path.basename(path))
    drawn = visualize.draw_instances(image, result["boxes"], result["scores"], result["labels"],
                                     result["masks"])
    stem = os.path.splitext(os.path.basename(path))[0]
    png = os.path.join(out_dir, f"{index:04d}_{stem}.png")
    visualize.save_png(drawn, png)
    overlays.append(png)
  results_path = os.path.join(out_dir, "results.json")
  with open(results_path, "w") as f:
    json.dump({"detections": records, "images": [os.path.basename(p) for p in paths],
               "failed": [{"path": p, "reason": r} for p, r in failed]}, f)
  return {"results": results_path, "overlays": overlays, "failed": failed,
          "num_instances": len(records)}
