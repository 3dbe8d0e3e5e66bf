"""Per-example TensorFlow transforms: flip, scale jitter, crop, pad, box, mask and keypoint targets.

:func:`transform_example` turns a *raw* example (original pixels, full-size instance masks) into
one element of the batch contract (all shapes static):

  image [H, W, 3] uint8 · gt_boxes [G, 4] float32 xyxy pixels of the padded input ·
  gt_classes [G] int32 · gt_masks [G, S, S] uint8 · gt_valid [G] bool · image_id int32 ·
  original_size [2] int32 (h, w) · image_scale [2] float32 (sy, sx) · valid_size [2] int32 ·
  example_valid bool   (plus ``_num_truncated`` int32, popped by the pipeline)
  and with keypoints (``num_keypoints`` = K > 0): gt_keypoints [G, K, 3] float32 (x, y, v)

Geometry. The image is scaled, optionally flipped horizontally, randomly cropped to at most
(H, W) (only when the scaled image overflows, i.e. large-scale jitter), then zero-padded at the
bottom/right. The scale fits the image into (H, W) times the jitter, ``min(H/h, W/w) * jitter``
(TF's TPU Mask R-CNN; ``jitter`` ~ U(scale_range) in training, 1 in evaluation), or with
``min_size`` > 0 follows torchvision / Detectron2: the shorter side to ``min_size * jitter``
unless the longer side would pass ``max_size``, ``min(min_size * jitter / min(h, w), max_size
/ max(h, w))``. Pixel (i, j) covers the continuous square [j, j+1) x [i, i+1); a box [x1, x2)
maps to [x1 * sx - ox, x2 * sx - ox), clipped to the valid region; boxes narrower or shorter
than 1 px afterwards are dropped, the rest keep their order, and more than G are truncated
(counted).

Keypoints follow the boxes' geometry: x -> (w - x if flipped) * sx - ox, y -> y * sy - oy, and
a flip also permutes the K points by ``keypoint_flip`` (left and right swap names,
:func:`keypoint_flip_permutation`). A point keeps its v only when v > 0 and it lies in the valid
region [0, vw] x [0, vh] afterwards; every other point, and every padding row, is (0, 0, 0).
Rows are those of gt_boxes.

Masks. Each kept instance's mask target is sampled directly from its *original* full-size
mask (no intermediate resize), at the centres of an S x S grid laid over its final box: cell
(r, c) covers [x1 + c * bw / S, x1 + (c+1) * bw / S) and takes the bilinear value at its centre,
thresholded at 0.5. The flip is folded into the sampling grid (``crop_and_resize`` reads
x1 > x2 as a mirrored crop), so the full-size mask is never flipped or resized.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import tensorflow as tf

NUM_TRUNCATED_KEY = "_num_truncated"


def output_signature(image_size: Sequence[int], max_instances: int, mask_size: int,
                     num_keypoints: int = 0):
  """``{key: (shape, tf.DType)}`` of one transformed example (the batch contract, unbatched);
  ``gt_keypoints`` only when ``num_keypoints`` > 0."""
  h, w = image_size
  g, s = max_instances, mask_size
  sig = {"image": ((h, w, 3), tf.uint8), "gt_boxes": ((g, 4), tf.float32),
         "gt_classes": ((g,), tf.int32), "gt_masks": ((g, s, s), tf.uint8)}
  if num_keypoints:
    sig["gt_keypoints"] = ((g, int(num_keypoints), 3), tf.float32)
  sig.update({"gt_valid": ((g,), tf.bool), "image_id": ((), tf.int32),
              "original_size": ((2,), tf.int32), "image_scale": ((2,), tf.float32),
              "valid_size": ((2,), tf.int32), "example_valid": ((), tf.bool),
              NUM_TRUNCATED_KEY: ((), tf.int32)})
  return sig


def keypoint_flip_permutation(names: Sequence[str],
                              pairs: Sequence[Sequence[Union[str, int]]] = ()) -> Tuple[int, ...]:
  """``perm`` [K]: after a horizontal flip, keypoint k is the flipped point ``perm[k]``.

  Args:
    names: the K keypoint names.
    pairs: (a, b) pairs that swap, each a name or a 0-based index; () derives them from the
      names: "left<rest>" <-> "right<rest>" where both exist (COCO's "left_eye" <->
      "right_eye", the shapes set's "left" <-> "right").

  Raises:
    ValueError: an unknown name or index, or a keypoint in two pairs (or paired with itself).
  """
  names = tuple(names)
  index = {n: i for i, n in enumerate(names)}
  if not pairs:
    pairs = [(n, "right" + n[4:]) for n in names if n.startswith("left")
             and "right" + n[4:] in index]

  def resolve(p):
    if isinstance(p, str):
      if p not in index:
        raise ValueError(f"keypoint flip pair names {p!r}, not one of the keypoints {list(names)}")
      return index[p]
    if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < len(names):
      raise ValueError(f"keypoint flip pair entry {p!r} is neither a keypoint name nor an index "
                       f"in 0..{len(names) - 1}")
    return p

  perm = list(range(len(names)))
  paired = set()
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"keypoint flip pairs are (a, b) pairs, got {pair!r}")
    i, j = resolve(pair[0]), resolve(pair[1])
    if i == j or i in paired or j in paired:
      raise ValueError(f"keypoint flip pair {tuple(pair)!r}: a keypoint can swap with one other")
    paired.update((i, j))
    perm[i], perm[j] = j, i
  return tuple(perm)


def check_resize(image_size: Sequence[int], min_size: int, max_size: int) -> None:
  """``ValueError`` unless (min_size, max_size) is off (0, 0) or a shorter-side rule whose
  largest image fits ``image_size`` (it is padded to it; evaluation never crops)."""
  if not min_size and not max_size:
    return
  if not 0 < min_size <= max_size:
    raise ValueError(f"need 0 < min_size <= max_size (or both 0), got min_size={min_size}, "
                     f"max_size={max_size}")
  if min(int(v) for v in image_size) < max_size:
    raise ValueError(f"image_size {tuple(image_size)} must hold max_size={max_size} on both "
                     "sides: a resized image is padded to image_size, never cropped")


def _draw_geometry(h, w, seed, image_size, training, scale_range, random_flip, min_size=0,
                   max_size=0):
  """Scale, flip and crop parameters; stateless in ``seed`` so an example is reproducible."""
  out_h, out_w = float(image_size[0]), float(image_size[1])
  seeds = tf.random.experimental.stateless_split(seed, 4)
  if training and tuple(scale_range) != (1.0, 1.0):
    jitter = tf.random.stateless_uniform([], seeds[0], scale_range[0], scale_range[1])
  else:
    jitter = tf.constant(1.0)
  if training and random_flip:
    flip = tf.random.stateless_uniform([], seeds[1]) < 0.5
  else:
    flip = tf.constant(False)
  if min_size:
    # Detectron2's multi-scale rule: the jitter draws the shorter side, the cap stays max_size.
    scale = tf.minimum(min_size * jitter / tf.minimum(h, w), max_size / tf.maximum(h, w))
  else:
    scale = tf.minimum(out_h / h, out_w / w) * jitter
  rh = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), 1)
  rw = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), 1)
  vh = tf.minimum(rh, int(image_size[0]))
  vw = tf.minimum(rw, int(image_size[1]))
  # Crop offsets are uniform over the valid positions (all zero unless the image overflows).
  u = tf.random.stateless_uniform([2], seeds[2])
  oy = tf.minimum(tf.cast(u[0] * tf.cast(rh - vh + 1, tf.float32), tf.int32), rh - vh)
  ox = tf.minimum(tf.cast(u[1] * tf.cast(rw - vw + 1, tf.float32), tf.int32), rw - vw)
  return flip, rh, rw, vh, vw, oy, ox


def _mask_targets(masks, idx, boxes_net, flip, h, w, sy, sx, oy, ox, mask_size):
  """[k, S, S] uint8 targets for instances ``idx`` of ``masks`` [N, h, w] with net boxes [k, 4]."""
  s = float(mask_size)
  # One edge-replicated pixel around the mask keeps samples near the border inside [0, size-1]
  # (crop_and_resize would otherwise return 0 there instead of the edge value).
  padded = tf.pad(masks, [[0, 0], [1, 1], [1, 1]], mode="SYMMETRIC")[..., None]
  bx1, by1, bx2, by2 = tf.unstack(boxes_net, axis=1)
  bw, bh = bx2 - bx1, by2 - by1
  # Centres of the first and last grid cells, in network pixels.
  cx0, cx1 = bx1 + 0.5 * bw / s, bx1 + (s - 0.5) * bw / s
  cy0, cy1 = by1 + 0.5 * bh / s, by1 + (s - 0.5) * bh / s

  def to_src_x(x):  # network x -> continuous x of the original, unflipped image
    xf = (x + tf.cast(ox, tf.float32)) / sx
    return tf.where(flip, w - xf, xf)

  def to_src_y(y):
    return (y + tf.cast(oy, tf.float32)) / sy

  # Continuous -> pixel-index coordinates (-0.5), +1 for the padding, normalised by the padded
  # size - 1 = size + 1 (crop_and_resize's corner-aligned convention).
  nx0 = (to_src_x(cx0) + 0.5) / (w + 1.0)
  nx1 = (to_src_x(cx1) + 0.5) / (w + 1.0)
  ny0 = (to_src_y(cy0) + 0.5) / (h + 1.0)
  ny1 = (to_src_y(cy1) + 0.5) / (h + 1.0)
  crops = tf.image.crop_and_resize(padded, tf.stack([ny0, nx0, ny1, nx1], axis=1),
                                   tf.cast(idx, tf.int32), [mask_size, mask_size])
  return tf.cast(crops[..., 0] >= 0.5, tf.uint8)


def _keypoint_targets(keypoints, num_keypoints, keypoint_flip, flip, w, sx, sy, fox, foy, fvw,
                      fvh):
  """[N, K, 3] float32 keypoints of every raw instance in network pixels (module docstring)."""
  kp = tf.reshape(tf.cast(keypoints, tf.float32), [-1, num_keypoints, 3])
  x, y, v = tf.unstack(kp, axis=2)
  x = tf.where(flip, w - x, x) * sx - fox  # the arithmetic of the box corners, so they agree
  y = y * sy - foy
  keep = (v > 0) & (x >= 0.0) & (x <= fvw) & (y >= 0.0) & (y <= fvh)
  kp = tf.where(keep[..., None], tf.stack([x, y, v], axis=2), 0.0)
  if keypoint_flip and tuple(keypoint_flip) != tuple(range(num_keypoints)):
    kp = tf.cond(flip, lambda: tf.gather(kp, list(keypoint_flip), axis=1), lambda: kp)
  return kp


def transform_example(raw: Dict[str, tf.Tensor], seed: tf.Tensor, *, image_size: Tuple[int, int],
                      max_instances: int, mask_size: int, training: bool,
                      scale_range: Sequence[float] = (1.0, 1.0),
                      random_flip: bool = False, min_size: int = 0,
                      max_size: int = 0, bucket: bool = False, num_keypoints: int = 0,
                      keypoint_flip: Sequence[int] = ()) -> Dict[str, tf.Tensor]:
  """One raw example -> one batch-contract example (see the module docstring).

  Args:
    raw: ``image`` [h, w, 3] uint8; ``boxes`` [N, 4] float32 xyxy original pixels; ``classes``
      [N] int32 in 1..K; ``masks`` [N, h, w] uint8 {0, 1}; ``image_id`` int32; ``ok`` bool;
      with ``num_keypoints`` > 0, ``keypoints`` [N, num_keypoints, 3] float32 (x, y, v)
      original pixels.
    seed: [2] int64 stateless seed of this example's augmentation.
    image_size: (H, W) of the padded output.
    max_instances: G.
    mask_size: S.
    training: draw jitter/flip/crop; evaluation only scales to fit.
    scale_range: (min, max) jitter factors.
    random_flip: flip horizontally with probability 0.5 (training only).
    min_size, max_size: 0, 0 scales the image to fit ``image_size``; else the shorter side to
      ``min_size`` (times the jitter in training), the longer at most ``max_size`` (see the
      module docstring; :func:`check_resize`).
    bucket: ``image_size`` is an aspect bucket that ``buckets.check_buckets`` found to hold
      every image sent to it (not necessarily max_size on both sides).
    num_keypoints: K > 0 adds ``gt_keypoints`` (module docstring); 0: no keypoints.
    keypoint_flip: [K] permutation applied to the keypoints of a flipped example
      (:func:`keypoint_flip_permutation`); () = none swap.
  """
  if keypoint_flip and sorted(keypoint_flip) != list(range(num_keypoints)):
    raise ValueError(f"keypoint_flip must be a permutation of range({num_keypoints}), got "
                     f"{tuple(keypoint_flip)}")
  if not bucket:
    check_resize(image_size, min_size, max_size)
  image = raw["image"]
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  flip, rh, rw, vh, vw, oy, ox = _draw_geometry(h, w, seed, image_size, training, scale_range,
                                                random_flip, min_size, max_size)
  sy, sx = tf.cast(rh, tf.float32) / h, tf.cast(rw, tf.float32) / w

  image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  resized = tf.image.resize(image, tf.stack([rh, rw]), method="bilinear")
  resized = resized[oy:oy + vh, ox:ox + vw]
  image_out = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
  image_out = tf.image.pad_to_bounding_box(image_out, 0, 0, image_size[0], image_size[1])

  x1, y1, x2, y2 = tf.unstack(tf.reshape(raw["boxes"], [-1, 4]), axis=1)
  x1, x2 = tf.where(flip, w - x2, x1), tf.where(flip, w - x1, x2)
  fvw, fvh = tf.cast(vw, tf.float32), tf.cast(vh, tf.float32)
  fox, foy = tf.cast(ox, tf.float32), tf.cast(oy, tf.float32)
  boxes = tf.stack([tf.clip_by_value(x1 * sx - fox, 0.0, fvw), tf.clip_by_value(y1 * sy - foy, 0.0, fvh),
                    tf.clip_by_value(x2 * sx - fox, 0.0, fvw), tf.clip_by_value(y2 * sy - foy, 0.0, fvh)],
                   axis=1)
  keep = tf.logical_and(boxes[:, 2] - boxes[:, 0] >= 1.0, boxes[:, 3] - boxes[:, 1] >= 1.0)
  idx = tf.where(keep)[:, 0]
  num_truncated = tf.maximum(tf.shape(idx)[0] - max_instances, 0)
  idx = idx[:max_instances]
  k = tf.shape(idx)[0]
  sel_boxes = tf.gather(boxes, idx)
  sel_classes = tf.gather(raw["classes"], idx)
  sel_masks = _mask_targets(raw["masks"], idx, sel_boxes, flip, h, w, sy, sx, oy, ox, mask_size)

  pad = max_instances - k
  out = {
      "image": image_out,
      "gt_boxes": tf.pad(sel_boxes, [[0, pad], [0, 0]]),
      "gt_classes": tf.pad(tf.cast(sel_classes, tf.int32), [[0, pad]]),
      "gt_masks": tf.pad(sel_masks, [[0, pad], [0, 0], [0, 0]]),
  }
  if num_keypoints:
    kp = _keypoint_targets(raw["keypoints"], num_keypoints, keypoint_flip, flip, w, sx, sy,
                           fox, foy, fvw, fvh)
    out["gt_keypoints"] = tf.pad(tf.gather(kp, idx), [[0, pad], [0, 0], [0, 0]])
  out.update({
      "gt_valid": tf.range(max_instances) < k,
      "image_id": tf.cast(raw["image_id"], tf.int32),
      "original_size": tf.stack([shape[0], shape[1]]),
      "image_scale": tf.stack([sy, sx]),
      "valid_size": tf.stack([vh, vw]),
      "example_valid": tf.cast(raw["ok"], tf.bool),
      NUM_TRUNCATED_KEY: num_truncated,
  })
  for key, (static_shape, _) in output_signature(image_size, max_instances, mask_size,
                                                 num_keypoints).items():
    out[key] = tf.ensure_shape(out[key], static_shape)
  return out
