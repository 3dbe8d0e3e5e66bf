"""A deterministic synthetic COCO-format data set of coloured squares, circles and triangles.

The embedded default data set for the README's main job and for tests: it writes real COCO files
(JPEG and PNG images plus ``instances_*.json``) so it runs through exactly the code path a user's
COCO-format data takes. Features exercised on purpose:

* three categories with *sparse* COCO ids (``square`` = 1, ``circle`` = 3, ``triangle`` = 7);
* several instances per image, overlapping; masks are *modal* (what is visible), as in COCO;
* segmentations as polygons (some with two parts), uncompressed RLE and compressed RLE;
* ``iscrowd`` regions (uncompressed RLE, as COCO stores them; at least every image 3 mod 7);
* a few images with no annotation at all (every image whose index is 5 mod 12);
* three aspect ratios (``size x size``, ``size x 3/4 size``, ``3/4 size x size``);
* optionally (``keypoints=True``, CLI ``--keypoints``) COCO person_keypoints-style fields, see
  below.

Every image is painted from the rasterisation pycocotools gives of its own annotation, so image
pixels and annotations agree exactly. The output depends only on the arguments.

Keypoints (``keypoints=True``). Every category gets ``keypoints`` = :data:`KEYPOINT_NAMES`
("top", "right", "bottom", "left") and ``skeleton`` = the cycle top-right-bottom-left (1-based
pairs, as COCO's); every non-crowd annotation gets ``keypoints`` (``[x1, y1, v1, ...]``, 12
numbers) and ``num_keypoints`` (how many have v > 0). The points are the shape's extreme
vertices (:func:`extreme_points`): a square's or triangle's corners (a triangle repeats one
corner), a circle's four extreme points; a square cut into two polygon parts keeps its own
corners. Ties (two vertices equally high, e.g. an axis-aligned square) go clockwise: top takes
the rightmost, right the lowest, bottom the leftmost, left the highest, so an axis-aligned
square gets its four corners, clockwise from the top-right. Visibility: v = 2 where the point's
pixel (``floor(y), floor(x)``) lies in the instance's visible (modal) mask, v = 1 where it does
not (occluded, or the vertex's pixel off the rasterised shape); a point outside the image is
not labelled, (0, 0, 0), as COCO leaves such points. Crowd annotations get 12 zeros. The points
come from the geometry alone (no random draw), so images, masks and every other field are
exactly those of ``keypoints=False``, which writes the same files as before keypoints existed.

Layout (COCO-like)::

  OUT/annotations/instances_train.json   OUT/train/000000000001.jpg ...
  OUT/annotations/instances_val.json     OUT/val/000000100001.png ...

CLI::

  python -m mrcnn_jax.data.shapes --out DIR --num_train 200 --num_val 50 --size 128 --seed 0
  python -m mrcnn_jax.data.shapes --out DIR --keypoints      # with keypoint annotations
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = (
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "circle", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
)
_SPLITS = (("train", 1), ("val", 100_001))  # split name, first image id
KEYPOINT_NAMES = ("top", "right", "bottom", "left")
KEYPOINT_SKELETON = ((1, 2), (2, 3), (3, 4), (4, 1))  # 1-based, as COCO's


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[List[float]]:
  """Polygon parts (COCO ``[x0, y0, x1, y1, ...]`` lists) of one shape of circumradius r."""
  if kind == "circle":
    t = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
  elif kind == "square":
    t = angle + np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
  else:  # triangle
    t = angle + np.array([0.0, 2.0 / 3.0, 4.0 / 3.0]) * np.pi
  xy = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
  return [[round(float(v), 2) for v in xy.reshape(-1)]]


def _split_square(part: List[float]) -> List[List[float]]:
  """Cuts a square polygon (4 corners) into two quadrilaterals along its mid-line."""
  p = np.asarray(part).reshape(4, 2)
  m01, m23 = (p[0] + p[1]) / 2, (p[2] + p[3]) / 2
  halves = [np.stack([p[0], m01, m23, p[3]]), np.stack([m01, p[1], p[2], m23])]
  return [[round(float(v), 2) for v in h.reshape(-1)] for h in halves]


def extreme_points(part: List[float]) -> np.ndarray:
  """[4, 2] float64 (x, y): the top, right, bottom and left vertex of polygon ``part``.

  Extremes in image coordinates (y down); ties go clockwise (see the module docstring).
  """
  p = np.asarray(part, np.float64).reshape(-1, 2)
  x, y = p[:, 0], p[:, 1]
  # np.lexsort sorts by its last key first: (primary, tie-break) -> keys (tie-break, primary).
  order = [np.lexsort((-x, y)), np.lexsort((-y, -x)), np.lexsort((x, -y)), np.lexsort((y, x))]
  return p[[o[0] for o in order]]


def keypoint_triplets(part: List[float], visible: np.ndarray) -> Tuple[List[float], int]:
  """COCO ``keypoints`` ([x1, y1, v1, ...]) of the shape with outline ``part`` and modal mask
  ``visible`` [h, w], and ``num_keypoints``."""
  h, w = visible.shape
  out = []
  for x, y in extreme_points(part):
    if not (0.0 <= x < w and 0.0 <= y < h):
      out += [0.0, 0.0, 0]  # off the image: not labelled
      continue
    v = 2 if visible[int(np.floor(y)), int(np.floor(x))] else 1
    out += [round(float(x), 2), round(float(y), 2), v]
  return out, sum(1 for v in out[2::3] if v > 0)


def _rasterize(polys: List[List[float]], h: int, w: int) -> np.ndarray:
  """[h, w] uint8 mask of the union of polygon parts, as pycocotools' annToMask draws it."""
  rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
  return mask_utils.decode(rle)


def uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
  """COCO uncompressed RLE of a [h, w] binary mask: column-major run lengths, zeros first."""
  flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat.size and flat[0] == 1:
    counts = [0] + counts
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _compressed_rle(mask: np.ndarray) -> Dict[str, Any]:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _image_size(index: int, size: int) -> Tuple[int, int]:
  short = max(8, round(0.75 * size))
  return ((size, size), (size, short), (short, size))[index % 3]


def _make_image(rng: np.random.Generator, index: int, size: int):
  """Returns (image [h, w, 3] uint8, list of (category_id, mask, iscrowd, polygon or None,
  outline)); ``outline`` is a non-crowd shape's own polygon (one part, before any cut), else
  None."""
  h, w = _image_size(index, size)
  background = rng.integers(0, 90, size=3)
  image = np.empty((h, w, 3), np.uint8)
  image[...] = background.astype(np.uint8)
  objects = []  # painted in order: later objects occlude earlier ones
  kinds = {c["name"]: c["id"] for c in CATEGORIES}
  if index % 12 != 5:
    if index % 7 == 3 or rng.random() < 0.1:  # a crowd region: a cluster of small same-category shapes
      kind = str(rng.choice(list(kinds)))
      cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
      polys = []
      for _ in range(int(rng.integers(3, 6))):
        polys += _polygon(kind, cx + rng.uniform(-0.12, 0.12) * w, cy + rng.uniform(-0.12, 0.12) * h,
                          0.04 * min(h, w) + 1.5, rng.uniform(0, np.pi))
      objects.append((kinds[kind], _rasterize(polys, h, w), 1, None, None))
    for _ in range(int(rng.integers(1, 6))):
      kind = str(rng.choice(list(kinds)))
      r = rng.uniform(0.1, 0.25) * min(h, w) + 2.0
      polys = _polygon(kind, rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6), r,
                       rng.uniform(0, np.pi))
      outline = polys[0]
      if kind == "square" and rng.random() < 0.3:
        polys = _split_square(polys[0])
      mask = _rasterize(polys, h, w)
      # Limit occlusion so that earlier objects stay recognisable.
      if mask.sum() < 4 or any((o[1] & mask).sum() > 0.4 * o[1].sum() for o in objects):
        continue
      objects.append((kinds[kind], mask, 0, polys, outline))
  colours = {}
  for k, (cat, mask, crowd, _, _) in enumerate(objects):
    colour = rng.integers(120, 256, size=3)
    colour[rng.integers(0, 3)] = rng.integers(0, 80)  # saturated, far from the dark background
    colours[k] = colour
    image[mask.astype(bool)] = colour.astype(np.uint8)
  # Modal masks: remove what later objects cover.
  result = []
  covered = np.zeros((h, w), np.uint8)
  for cat, mask, crowd, polys, outline in reversed(objects):
    visible = mask & (1 - covered)
    covered |= mask
    if visible.sum() == 0:
      continue
    result.append((cat, visible, crowd, polys if (visible == mask).all() else None, outline))
  return image, result[::-1]


def _annotation(rng, ann_id, image_id, cat, mask, crowd, polys, outline=None,
                keypoints=False) -> Dict[str, Any]:
  h, w = mask.shape
  if polys is not None and rng.random() < 0.6:
    seg = polys
  elif crowd or rng.random() < 0.5:
    seg = uncompressed_rle(mask)
  else:
    seg = _compressed_rle(mask)
  # bbox and area of exactly what annToMask returns for this segmentation.
  if isinstance(seg, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  else:
    rle = mask_utils.encode(np.asfortranarray(mask))
  ann = {"id": ann_id, "image_id": image_id, "category_id": int(cat), "segmentation": seg,
         "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
         "iscrowd": int(crowd)}
  if keypoints:
    if crowd:
      ann["keypoints"], ann["num_keypoints"] = [0] * (3 * len(KEYPOINT_NAMES)), 0
    else:
      ann["keypoints"], ann["num_keypoints"] = keypoint_triplets(outline, mask)
  return ann


def generate_split(out_dir: str, split: str, num_images: int, size: int, seed: int,
                   image_format: str = "mixed", first_image_id: Optional[int] = None,
                   first_ann_id: int = 1, keypoints: bool = False) -> str:
  """Writes one split; returns the path of its instances JSON.

  Args:
    out_dir: root folder; images go to ``out_dir/split``, the JSON to ``out_dir/annotations``.
    split: split name, e.g. ``'train'``.
    num_images: number of images.
    size: the longer image side in pixels.
    seed: the generator's seed; the output is a pure function of the arguments.
    image_format: ``'jpeg'``, ``'png'`` or ``'mixed'`` (even indices JPEG, odd PNG).
    first_image_id: id of the first image (ids step by 2 so they are sparse).
    first_ann_id: id of the first annotation.
    keypoints: add keypoint fields (module docstring); the images stay the same.
  """
  if image_format not in ("jpeg", "png", "mixed"):
    raise ValueError(f"image_format must be 'jpeg', 'png' or 'mixed', got {image_format!r}")
  if first_image_id is None:
    first_image_id = dict(_SPLITS).get(split, 1)
  split_idx = [s for s, _ in _SPLITS].index(split) if split in dict(_SPLITS) else 7
  os.makedirs(os.path.join(out_dir, split), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
  images, annotations = [], []
  ann_id = first_ann_id
  for i in range(num_images):
    rng = np.random.default_rng([seed, split_idx, i])
    image, objects = _make_image(rng, i, size)
    image_id = first_image_id + 2 * i
    png = image_format == "png" or (image_format == "mixed" and i % 2 == 1)
    file_name = f"{image_id:012d}." + ("png" if png else "jpg")
    path = os.path.join(out_dir, split, file_name)
    if png:
      Image.fromarray(image).save(path, format="PNG", compress_level=1)
    else:
      Image.fromarray(image).save(path, format="JPEG", quality=95)
    images.append({"id": image_id, "file_name": file_name, "height": int(image.shape[0]),
                   "width": int(image.shape[1])})
    for cat, mask, crowd, polys, outline in objects:
      annotations.append(_annotation(rng, ann_id, image_id, cat, mask, crowd, polys, outline,
                                     keypoints))
      ann_id += 1
  categories = [dict(c) for c in CATEGORIES]
  if keypoints:
    for c in categories:
      c.update(keypoints=list(KEYPOINT_NAMES), skeleton=[list(e) for e in KEYPOINT_SKELETON])
  data = {"info": {"description": f"mrcnn_jax synthetic shapes, seed {seed}"}, "licenses": [],
          "images": images, "annotations": annotations, "categories": categories}
  json_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
  with open(json_path, "w") as f:
    json.dump(data, f)
  return json_path


def generate(out_dir: str, num_train: int = 200, num_val: int = 50, size: int = 128, seed: int = 0,
             image_format: str = "mixed", keypoints: bool = False) -> Dict[str, str]:
  """Writes the train and val splits; returns the paths a ``config.data`` needs.

  ``keypoints=True`` adds the keypoint fields (module docstring; K = 4, to train with
  ``config.model.keypoint.num_keypoints = 4``) to the same images and annotations.

  Returns:
    ``{'train_annotations', 'train_images', 'eval_annotations', 'eval_images'}``, ready for
    ``config.data.update(...)``.
  """
  generate_split(out_dir, "train", num_train, size, seed, image_format, keypoints=keypoints)
  generate_split(out_dir, "val", num_val, size, seed, image_format, first_ann_id=10_000_000,
                 keypoints=keypoints)
  return data_paths(out_dir)


def data_paths(out_dir: str) -> Dict[str, str]:
  """The ``config.data`` paths of a folder :func:`generate` wrote (it need not exist yet)."""
  return {"train_annotations": os.path.join(out_dir, "annotations", "instances_train.json"),
          "train_images": os.path.join(out_dir, "train"),
          "eval_annotations": os.path.join(out_dir, "annotations", "instances_val.json"),
          "eval_images": os.path.join(out_dir, "val")}


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num_train", type=int, default=200)
  parser.add_argument("--num_val", type=int, default=50)
  parser.add_argument("--size", type=int, default=128, help="longer image side, pixels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--format", default="mixed", choices=("jpeg", "png", "mixed"))
  parser.add_argument("--keypoints", action="store_true",
                      help="add COCO keypoints: each shape's top/right/bottom/left vertex")
  args = parser.parse_args(argv)
  paths = generate(args.out, args.num_train, args.num_val, args.size, args.seed, args.format,
                   keypoints=args.keypoints)
  print(json.dumps(paths, indent=2))


if __name__ == "__main__":
  main()
