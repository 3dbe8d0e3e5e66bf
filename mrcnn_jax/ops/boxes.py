"""Box arithmetic: areas, pairwise IoU, clipping, format conversion and the box coder.

Boxes are ``xyxy`` float32 in pixels of the network input (the torchvision/Detectron2
convention). Every function here is a pure ``jnp`` expression with static shapes, so it traces
once under ``jax.jit`` and batches with ``jax.vmap`` (or through its leading ``...`` dims).

The box coder follows torchvision's ``BoxCoder`` (Detectron2's ``Box2BoxTransform``): for an
anchor of centre ``(xa, ya)`` and size ``(wa, ha)`` and a target box ``(x, y, w, h)``,

    dx = wx (x - xa) / wa,   dy = wy (y - ya) / ha,   dw = ww log(w / wa),   dh = wh log(h / ha)

(Girshick et al., "Rich feature hierarchies ...", 2014, appendix C). The RPN uses weights
``(1, 1, 1, 1)``, the Fast R-CNN box head ``(10, 10, 5, 5)``.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from mrcnn_jax.ops._checks import check_shape

ArrayLike = jax.typing.ArrayLike
ImageSize = Union[Tuple[int, int], Sequence[int], jax.Array]

# torchvision's default ``bbox_xform_clip``: a predicted box may grow at most 1000/16 times
# the anchor in either side, which keeps ``exp`` finite for wild early-training deltas.
DEFAULT_SCALE_CLIP = math.log(1000.0 / 16)


def _check_boxes(name: str, x) -> None:
  """Raises ``ValueError`` unless ``x`` has shape ``[..., 4]`` (rank >= 1)."""
  shape = tuple(getattr(x, "shape", ()))
  if len(shape) < 1 or shape[-1] != 4:
    raise ValueError(f"{name} must have shape [..., 4], got shape {shape}")


def _split(boxes: jax.Array):
  return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def box_area(boxes: ArrayLike) -> jax.Array:
  """Areas of ``xyxy`` boxes, as ``torchvision.ops.box_area``.

  Args:
    boxes: [..., 4] float32, xyxy pixels.

  Returns:
    [...] float32: ``(x2 - x1) * (y2 - y1)``. Not clamped, as in torchvision: a box with
    ``x2 < x1`` (and ``y2 >= y1``) has a negative area.
  """
  _check_boxes("boxes", boxes)
  boxes = jnp.asarray(boxes, jnp.float32)
  x1, y1, x2, y2 = _split(boxes)
  return (x2 - x1) * (y2 - y1)


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> jax.Array:
  """Pairwise intersection over union, as ``torchvision.ops.box_iou``.

  Args:
    boxes_a: [N, 4] float32, xyxy pixels.
    boxes_b: [M, 4] float32, xyxy pixels.

  Returns:
    [N, M] float32 IoU. Where the union is not positive (two empty boxes; torchvision gives
    NaN there) the IoU is 0, so padded all-zero boxes never match anything.
  """
  check_shape("boxes_a", boxes_a, 2, (4,))
  check_shape("boxes_b", boxes_b, 2, (4,))
  boxes_a = jnp.asarray(boxes_a, jnp.float32)
  boxes_b = jnp.asarray(boxes_b, jnp.float32)
  area_a = box_area(boxes_a)
  area_b = box_area(boxes_b)
  lt = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])  # [N, M, 2]
  rb = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # [N, M, 2]
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]  # [N, M]
  union = area_a[:, None] + area_b[None, :] - inter
  positive = union > 0
  # The safe denominator keeps the gradient finite where the result is replaced by 0.
  return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def clip_boxes(boxes: ArrayLike, image_size: ImageSize) -> jax.Array:
  """Clips boxes to ``[0, w] x [0, h]``, as ``torchvision.ops.clip_boxes_to_image``.

  Args:
    boxes: [..., 4] float32, xyxy pixels.
    image_size: ``(h, w)``: Python ints or an int/float array [2] (may be traced, e.g. one
      image's true size inside a vmapped per-image function).

  Returns:
    [..., 4] float32 clipped boxes.
  """
  _check_boxes("boxes", boxes)
  boxes = jnp.asarray(boxes, jnp.float32)
  if isinstance(image_size, (tuple, list)):
    if len(image_size) != 2:
      raise ValueError(f"image_size must be (h, w), got {image_size}")
    height, width = image_size
  else:
    check_shape("image_size", image_size, 1, (2,))
    size = jnp.asarray(image_size, jnp.float32)
    height, width = size[0], size[1]
  x1, y1, x2, y2 = _split(boxes)
  x1 = jnp.clip(x1, 0.0, width)
  x2 = jnp.clip(x2, 0.0, width)
  y1 = jnp.clip(y1, 0.0, height)
  y2 = jnp.clip(y2, 0.0, height)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def xyxy_to_cxcywh(boxes: ArrayLike) -> jax.Array:
  """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)``.

  Args:
    boxes: [..., 4] float32, xyxy pixels.

  Returns:
    [..., 4] float32, centre and size in pixels.
  """
  _check_boxes("boxes", boxes)
  boxes = jnp.asarray(boxes, jnp.float32)
  x1, y1, x2, y2 = _split(boxes)
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes: ArrayLike) -> jax.Array:
  """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)``.

  Args:
    boxes: [..., 4] float32, centre and size in pixels.

  Returns:
    [..., 4] float32, xyxy pixels.
  """
  _check_boxes("boxes", boxes)
  boxes = jnp.asarray(boxes, jnp.float32)
  cx, cy, w, h = _split(boxes)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def _centres_and_sizes(boxes: jax.Array):
  # Written as torchvision writes it (``x1 + 0.5 * w``, not ``(x1 + x2) / 2``), so the coder
  # agrees with the oracle to the last bit rather than to a rounding error.
  x1, y1, x2, y2 = _split(boxes)
  w = x2 - x1
  h = y2 - y1
  return x1 + 0.5 * w, y1 + 0.5 * h, w, h


def encode_boxes(
    boxes: ArrayLike,
    anchors: ArrayLike,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> jax.Array:
  """Regression targets that take ``anchors`` to ``boxes`` (torchvision ``BoxCoder.encode``).

  Args:
    boxes: [..., 4] float32, xyxy pixels: the targets (matched GT boxes).
    anchors: [..., 4] float32, xyxy pixels, broadcastable against ``boxes``: the references
      (anchors or proposals). They must have positive width and height.
    weights: ``(wx, wy, ww, wh)``, static Python floats.

  Returns:
    deltas: [..., 4] float32 ``(dx, dy, dw, dh)``. A target of zero width or height gives
    ``-inf`` for ``dw``/``dh``, as in torchvision; callers mask such boxes out.
  """
  _check_boxes("boxes", boxes)
  _check_boxes("anchors", anchors)
  wx, wy, ww, wh = (float(v) for v in weights)
  boxes = jnp.asarray(boxes, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  ax, ay, aw, ah = _centres_and_sizes(anchors)
  gx, gy, gw, gh = _centres_and_sizes(boxes)
  dx = wx * (gx - ax) / aw
  dy = wy * (gy - ay) / ah
  dw = ww * jnp.log(gw / aw)
  dh = wh * jnp.log(gh / ah)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas: ArrayLike,
    anchors: ArrayLike,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = DEFAULT_SCALE_CLIP,
) -> jax.Array:
  """Applies regression ``deltas`` to ``anchors`` (torchvision ``BoxCoder.decode_single``).

  Args:
    deltas: [..., 4] float32 ``(dx, dy, dw, dh)``.
    anchors: [..., 4] float32, xyxy pixels, broadcastable against ``deltas`` (for
      class-specific deltas [N, K, 4] pass anchors [N, 1, 4]).
    weights: ``(wx, wy, ww, wh)``, static Python floats.
    clip: ``dw`` and ``dh`` (after dividing by the weights) are clamped from above to this
      value before ``exp``.

  Returns:
    boxes: [..., 4] float32, xyxy pixels (not clipped to the image).
  """
  _check_boxes("deltas", deltas)
  _check_boxes("anchors", anchors)
  wx, wy, ww, wh = (float(v) for v in weights)
  deltas = jnp.asarray(deltas, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  ax, ay, aw, ah = _centres_and_sizes(anchors)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  cx = dx * aw + ax
  cy = dy * ah + ay
  half_w = 0.5 * (jnp.exp(dw) * aw)
  half_h = 0.5 * (jnp.exp(dh) * ah)
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def small_box_mask(boxes: ArrayLike, min_size: float) -> jax.Array:
  """Which boxes are large enough to keep (torchvision ``remove_small_boxes`` as a mask).

  Args:
    boxes: [..., 4] float32, xyxy pixels.
    min_size: the smallest allowed width and height, in pixels.

  Returns:
    [...] bool: True where ``w >= min_size`` and ``h >= min_size``.
  """
  _check_boxes("boxes", boxes)
  boxes = jnp.asarray(boxes, jnp.float32)
  x1, y1, x2, y2 = _split(boxes)
  return ((x2 - x1) >= min_size) & ((y2 - y1) >= min_size)
