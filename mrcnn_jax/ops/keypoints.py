"""Keypoint ops (He et al., "Mask R-CNN", 2017, sec. 5): heatmap targets and decoding.

Each keypoint of a RoI is an ``S x S`` heatmap (``S = 56`` in torchvision's Keypoint R-CNN):
training is a softmax over the ``S * S`` pixels with the GT keypoint's pixel as the label, and
inference reads the upsampled heatmap's maximum. Both ops are written for one image
(``jax.vmap`` them for a batch) and are static-shape ``jnp``.

* ``keypoint_targets`` = ``torchvision.models.detection.roi_heads.keypoints_to_heatmap``: a
  keypoint ``x`` falls in heatmap column ``floor((x - x1) * S / (x2 - x1))`` (a point exactly on
  ``x2`` in column ``S - 1``), and likewise for rows; it counts only inside the heatmap and when
  labelled (``v > 0``).
* ``heatmaps_to_keypoints`` = ``roi_heads.heatmaps_to_keypoints``: each RoI's heatmaps are
  resized to ``ceil(h) x ceil(w)`` RoI pixels with ``F.interpolate(mode="bicubic",
  align_corners=False)`` and the argmax pixel's centre is the keypoint. The resize is separable,
  so one RoI's upsampled map is ``Ry @ map @ Rx^T`` with per-RoI interpolation matrices (rows
  past the RoI's own size are masked out of the argmax), padded to a static ``max_resize``.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops._checks import check_shape

ArrayLike = jax.typing.ArrayLike

# PyTorch's bicubic kernel parameter (Keys' cubic convolution with a = -0.75).
_CUBIC_A = -0.75


def keypoint_targets(keypoints: ArrayLike, rois: ArrayLike, matched: ArrayLike,
                     heatmap_size: int) -> Tuple[jax.Array, jax.Array]:
  """Keypoint-head training targets: the heatmap pixel of each matched GT keypoint.

  Equal to torchvision's ``keypoints_to_heatmap(keypoints[matched], rois, heatmap_size)``
  (with ``valid`` as bool), the same float32 arithmetic: ``floor((x - x1) * (S / (x2 - x1)))``,
  ``x == x2`` maps to ``S - 1``, and an entry is valid where ``0 <= x, y < S`` and ``v > 0``.
  A degenerate RoI (``x2 == x1``) gives invalid entries, as torchvision's integer conversion of
  an infinite scale does on x86 (a point on such a RoI's edge still maps to ``S - 1``).

  Args:
    keypoints: [G, K, 3] float32 ``(x, y, v)`` of one image's GT instances, pixels of the
      network input; ``v > 0`` marks a labelled keypoint.
    rois: [R, 4] float32, xyxy pixels.
    matched: [R] int, the GT index of each RoI; negative gives an all-invalid row (torchvision
      is never passed one).
    heatmap_size: static int ``S``, the heatmap side.

  Returns:
    (targets, valid): targets [R, K] int32, the linear index ``y * S + x`` into the heatmap
    (0 where invalid); valid [R, K] bool.
  """
  keypoints, rois, matched = jnp.asarray(keypoints), jnp.asarray(rois), jnp.asarray(matched)
  check_shape("keypoints", keypoints, 3, (3,))
  check_shape("rois", rois, 2, (4,))
  check_shape("matched", matched, 1)
  if matched.shape[0] != rois.shape[0]:
    raise ValueError(f"matched {matched.shape} must have one entry per RoI, rois {rois.shape}")
  if heatmap_size < 1:
    raise ValueError(f"heatmap_size must be >= 1, got {heatmap_size}")
  r, k = rois.shape[0], keypoints.shape[1]
  if keypoints.shape[0] == 0:
    return jnp.zeros((r, k), jnp.int32), jnp.zeros((r, k), bool)
  return _keypoint_targets(keypoints, rois, matched, int(heatmap_size))


def _heatmap_bin(p, lo, hi, s: int):
  """torchvision's heatmap bin of coordinates ``p`` [R, K] in RoIs ``[lo, hi]`` [R]: float."""
  scale = s / (hi - lo)  # same operation order as torchvision (scale first)
  b = jnp.floor((p - lo[:, None]) * scale[:, None])
  # torchvision's boundary rule: a point on the far edge belongs to the last bin.
  return jnp.where(p == hi[:, None], jnp.float32(s - 1), b)


# Jitted so that eager (notebook) calls run as one compiled program, not op by op.
@functools.partial(jax.jit, static_argnums=(3,))
def _keypoint_targets(keypoints, rois, matched, s):
  keypoints, rois = keypoints.astype(jnp.float32), rois.astype(jnp.float32)
  has_gt = matched >= 0
  kp = keypoints[jnp.where(has_gt, matched, 0).astype(jnp.int32)]  # [R, K, 3]
  bx = _heatmap_bin(kp[..., 0], rois[:, 0], rois[:, 2], s)
  by = _heatmap_bin(kp[..., 1], rois[:, 1], rois[:, 3], s)
  # Compared as floats: NaN and +-inf (a zero-size RoI) fall outside, as in torchvision.
  valid = ((bx >= 0) & (bx < s) & (by >= 0) & (by < s) & (kp[..., 2] > 0)
           & has_gt[:, None])
  ix = jnp.clip(jnp.where(valid, bx, 0.0), 0, s - 1).astype(jnp.int32)
  iy = jnp.clip(jnp.where(valid, by, 0.0), 0, s - 1).astype(jnp.int32)
  return jnp.where(valid, iy * s + ix, 0), valid


def _cubic_coefficients(t):
  """PyTorch's four bicubic weights (A = -0.75) of taps ``i0 - 1 .. i0 + 2`` at fraction ``t``.

  Evaluated in the order of PyTorch's ``get_cubic_upsample_coefficients`` so the float32
  values agree with ``F.interpolate``.
  """
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  u = 1.0 - t
  return jnp.stack([far(t + 1.0), near(t), near(u), far(u + 1.0)], axis=-1)


def _bicubic_matrix(out_len, n_in: int, n_max: int):
  """Per-RoI bicubic (align_corners=False) resize matrices of one axis: [D, n_max, n_in].

  Row ``j < out_len`` holds the weights with which output pixel ``j`` of an ``n_in -> out_len``
  resize reads the input, PyTorch's rule: source ``u = (j + 0.5) * n_in / out_len - 0.5``,
  taps ``floor(u) - 1 .. floor(u) + 2`` clamped to the edge pixels. Rows ``>= out_len`` are 0.

  Args:
    out_len: [D] int32 output length of each RoI (1 <= out_len <= n_max).
    n_in: static int, input length.
    n_max: static int, rows of the padded matrix.
  """
  j = jnp.arange(n_max, dtype=jnp.float32)[None, :]
  scale = jnp.float32(n_in) / out_len.astype(jnp.float32)  # PyTorch: float(in) / out
  u = scale[:, None] * (j + 0.5) - 0.5  # [D, n_max]
  i0 = jnp.minimum(jnp.floor(u), n_in - 1)
  t = jnp.clip(u - i0, 0.0, 1.0)
  w = _cubic_coefficients(t)  # [D, n_max, 4]
  taps = jnp.clip(i0[..., None].astype(jnp.int32) + jnp.arange(-1, 3), 0, n_in - 1)
  # Clamped taps may repeat an index: the one-hot sum adds their weights.
  mat = jnp.sum(jax.nn.one_hot(taps, n_in, dtype=jnp.float32) * w[..., None], axis=-2)
  return jnp.where((j < out_len[:, None])[..., None], mat, 0.0)


def heatmaps_to_keypoints(maps: ArrayLike, rois: ArrayLike,
                          max_resize: int = 128) -> Tuple[jax.Array, jax.Array]:
  """Keypoint coordinates and scores from keypoint-head heatmaps, static-shape.

  torchvision's ``heatmaps_to_keypoints``: for each RoI (sides ``w, h`` clamped to >= 1), each
  ``S x S`` heatmap is resized to ``ceil(h) x ceil(w)`` with PyTorch's bicubic interpolation
  (``align_corners=False``, ``a = -0.75``, edge-clamped taps); the first maximum in row-major
  order, at integer pixel ``(x_i, y_i)``, gives ``x = (x_i + 0.5) * (w / ceil(w)) + x1`` (and
  likewise ``y``), and its interpolated logit is the score.

  Static shapes cap each resized side at ``max_resize``. A RoI side of at most ``max_resize``
  pixels gives torchvision's result (the same grid and tie rule; interpolated values agree to
  float32 rounding). Along a longer side the same bicubic surface is read at ``max_resize``
  evenly spaced points instead of ``ceil(side)``: exactly torchvision's computation with that
  side resized to ``max_resize`` pixels, so ``x = (x_i + 0.5) * side / max_resize + x1`` is the
  centre of one of ``max_resize`` cells of ``side / max_resize`` pixels (a rounding of up to
  half a cell, where torchvision's is half a pixel). For a round peak inside the heatmap (what
  the head is trained to output) the point lies within one cell of torchvision's; on a flat top
  (a peak on the heatmap's edge, where the edge-clamped bicubic surface is flat) or with two
  near-equal peaks, both picks are arbitrary among near-equal values and may be further apart.

  Cost: the upsampled maps, ``D * K * max_resize**2`` float32 (111 MB for D = 100, K = 17 and
  the default 128), plus ``D * K * S * max_resize`` for the half-resized ones; two
  batched matmuls of ``2 * D * K * max_resize * S * (S + max_resize)`` flops (4.5 GFLOP at
  those sizes with S = 56).

  Args:
    maps: [D, K, S, S] float32 (or bfloat16) heatmap logits of D RoIs.
    rois: [D, 4] float32, xyxy pixels.
    max_resize: static int >= 1, the largest resized side (default 128).

  Returns:
    (xy, scores): xy [D, K, 2] float32 ``(x, y)`` in the pixels of ``rois``; scores [D, K]
    float32, the interpolated heatmap logit at that point.
  """
  maps, rois = jnp.asarray(maps), jnp.asarray(rois)
  check_shape("maps", maps, 4)
  check_shape("rois", rois, 2, (4,))
  d, k, s, s2 = maps.shape
  if s != s2 or rois.shape[0] != d:
    raise ValueError(f"maps must be [D, K, S, S] and rois [D, 4], got {maps.shape} and "
                     f"{rois.shape}")
  if max_resize < 1:
    raise ValueError(f"max_resize must be >= 1, got {max_resize}")
  return _heatmaps_to_keypoints(maps, rois, int(max_resize))


@functools.partial(jax.jit, static_argnums=(2,))
def _heatmaps_to_keypoints(maps, rois, max_resize):
  d, k, s, _ = maps.shape
  maps, rois = maps.astype(jnp.float32), rois.astype(jnp.float32)
  widths = jnp.maximum(rois[:, 2] - rois[:, 0], 1.0)
  heights = jnp.maximum(rois[:, 3] - rois[:, 1], 1.0)
  out_w = jnp.minimum(jnp.ceil(widths), max_resize).astype(jnp.int32)
  out_h = jnp.minimum(jnp.ceil(heights), max_resize).astype(jnp.int32)
  rx = _bicubic_matrix(out_w, s, max_resize)  # [D, M, S]
  ry = _bicubic_matrix(out_h, s, max_resize)
  hp = jax.lax.Precision.HIGHEST  # exact float32 sums (TPU/GPU matmuls default lower)
  # Columns first, then rows: PyTorch's CPU kernel sums the taps in that nesting.
  cols = jnp.einsum("dkab,djb->dkaj", maps, rx, precision=hp)  # [D, K, S, M]
  up = jnp.einsum("dia,dkaj->dkij", ry, cols, precision=hp)  # [D, K, M, M]
  m = max_resize
  inside = ((jnp.arange(m)[None, :, None] < out_h[:, None, None])
            & (jnp.arange(m)[None, None, :] < out_w[:, None, None]))  # [D, M, M]
  flat = jnp.where(inside[:, None], up, -jnp.inf).reshape(d, k, m * m)
  # The first maximum in row-major order of the padded grid is the first of the RoI's block.
  pos = jnp.argmax(flat, axis=-1)
  scores = jnp.take_along_axis(flat, pos[..., None], axis=-1)[..., 0]
  x_int, y_int = pos % m, pos // m
  x_corr = widths / out_w.astype(jnp.float32)  # torchvision's width_correction
  y_corr = heights / out_h.astype(jnp.float32)
  x = (x_int.astype(jnp.float32) + 0.5) * x_corr[:, None] + rois[:, 0:1]
  y = (y_int.astype(jnp.float32) + 0.5) * y_corr[:, None] + rois[:, 1:2]
  return jnp.stack([x, y], axis=-1), scores
