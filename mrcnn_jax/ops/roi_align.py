"""RoIAlign (He et al., "Mask R-CNN", 2017) as a static-shape gather + bilinear interpolation.

``roi_align`` equals ``torchvision.ops.roi_align`` for a fixed ``sampling_ratio >= 1`` and either
value of ``aligned``; ``multilevel_roi_align`` equals ``torchvision.ops.MultiScaleRoIAlign`` (FPN
level per RoI, Lin et al., "Feature Pyramid Networks", 2017, eq. 1). Both are plain ``jnp``:
they jit, vmap, run on TPU, and JAX autodiff gives the gradient (a scatter-add of the same
bilinear weights, i.e. torchvision's backward).

How one RoI is pooled (torchvision's rules, which this file reproduces exactly)
-------------------------------------------------------------------------------
Work in feature-map coordinates, where pixel ``i`` covers ``[i, i + 1)`` and its value sits at
its centre ``i + 0.5``. A box ``(x1, y1, x2, y2)`` in image pixels maps to
``x1 * spatial_scale - offset`` ... with ``offset = 0.5`` when ``aligned`` (so continuous
coordinate ``c`` reads pixel centres at ``c`` exactly) and ``0`` for the legacy ``aligned=False``
(which is half a pixel off and, to avoid dividing by ~0, forces the RoI to be >= 1 pixel).

The RoI is split into ``oh x ow`` bins. Each bin holds a regular ``g x g`` grid of sample points,
``g = sampling_ratio``, at the centres of a ``g x g`` subdivision of the bin:

    y(ph, iy) = y_start + ph * bin_h + (iy + 0.5) * bin_h / g,    ph < oh, iy < g

and likewise ``x(pw, ix)``. The output of a bin is the mean of the bilinearly interpolated
feature at its ``g * g`` sample points.

Bilinear weights, per axis. A sample ``y`` further than one pixel outside the map
(``y < -1`` or ``y > H``) contributes 0. Otherwise it is clamped into ``[0, H - 1]``, and with
``y0 = floor(y)``, ``y1 = min(y0 + 1, H - 1)``, ``ly = y - y0`` it reads row ``y0`` with weight
``1 - ly`` and row ``y1`` with weight ``ly``. The 2-D weight of a corner ``(yi, xj)`` is the
product of its row weight and its column weight, and a sample is dropped if *either* coordinate
is out of range. So the interpolation is *separable*: per RoI, ``oh * g * 2`` (row, weight)
pairs and ``ow * g * 2`` (column, weight) pairs describe every sample.

Implementation: the ``(oh*g*2) x (ow*g*2)`` grid of corner pixels (every row index against
every column index, all channels at once: gathers of contiguous ``C``-vectors from an NHWC map)
is summed with the separable weights, one term per corner offset, so that XLA fuses the gathers
into the sum (:func:`pool_corners`). That reads exactly the corners torchvision's kernel reads,
once per RoI, and all RoIs go in one fused computation (:func:`pool_all_rois`).

Multilevel (FPN): each RoI gets its level from eq. 1 of the FPN paper, and with it that level's
pixel table, size and scale, so every RoI is sampled once, on its own level (the "multilevel
crop and resize" of the TPU Mask R-CNN), instead of on every level followed by a select: the
levels are concatenated into one ``[B * sum(Hl * Wl), C]`` table and each RoI indexes it at its
level's offset.

``pool_rois`` (both entry points) replaces :func:`pool_all_rois` with another implementation
of the same signature and values (``mrcnn_jax.kernels``: a per-RoI loop for XLA:CPU).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops._checks import check_shape

ArrayLike = jax.typing.ArrayLike
OutputSize = Union[int, Tuple[int, int], Sequence[int]]
# (tables, level, index, wy, wx) -> [R, oh, ow, C]: see :func:`pool_all_rois`.
PoolRois = Callable[[Sequence[jax.Array], jax.Array, jax.Array, jax.Array, jax.Array],
                    jax.Array]


def _pair(output_size: OutputSize) -> Tuple[int, int]:
  if isinstance(output_size, int):
    return output_size, output_size
  oh, ow = output_size
  return int(oh), int(ow)


def _check_sampling_ratio(sampling_ratio: int) -> int:
  if int(sampling_ratio) <= 0:
    raise ValueError(
        "sampling_ratio must be >= 1, got "
        f"{sampling_ratio}: torchvision's adaptive mode (sampling_ratio <= 0) takes "
        "ceil(roi_size / output_size) samples per bin, a number that depends on the box "
        "values, so it has no static shape under jit; pick a fixed sampling_ratio (2 is the "
        "Mask R-CNN default).")
  return int(sampling_ratio)


def _divide(x: jax.Array, d: int) -> jax.Array:
  """``x / d``, correctly rounded like torchvision's C++ ``float`` division.

  XLA rewrites a division by a constant as a multiplication by its (rounded) reciprocal, which
  is 1 ulp off for ``d = 7``; in a 200-pixel map 1 ulp moves a sample by 1.5e-5 pixels and the
  result by ~1e-5 relative. Hiding the divisor behind an optimization barrier keeps a true
  division.
  """
  return x / jax.lax.optimization_barrier(jnp.full(x.shape, d, x.dtype))


def _axis_samples(start: jax.Array, length: jax.Array, out_len: int, grid: int,
                  extent: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Corner indices and bilinear weights of the sample points along one axis.

  Args:
    start: [...] float32, RoI start on this axis, feature-map coordinates (offset applied).
    length: [...] float32, RoI length on this axis (already forced >= 1 if not aligned).
    out_len: number of output bins on this axis.
    grid: samples per bin on this axis (``sampling_ratio``).
    extent: [...] int32, size of the feature map on this axis (H or W of the RoI's level).

  Returns:
    index: [..., out_len * grid * 2] int32, for each sample its low then high corner.
    weight: [..., out_len, grid * 2] float32, the matching bilinear weights, 0 for samples
      outside ``[-1, extent]``.
  """
  bin_size = _divide(length, out_len)
  p = jnp.arange(out_len, dtype=jnp.float32)[:, None]           # [P, 1]
  i = jnp.arange(grid, dtype=jnp.float32)[None, :] + 0.5         # [1, G]
  start, bin_size = start[..., None, None], bin_size[..., None, None]
  # Same float32 operation order as torchvision's kernel: start + p*bin + ((i+.5)*bin)/g.
  step = p * bin_size
  # XLA's CPU backend contracts ``start + p * bin`` into one fused multiply-add (rounded once
  # instead of twice as in torchvision), again a 1-ulp shift of the samples. A select between
  # the multiply and the add blocks the contraction; it changes nothing else (a NaN box has
  # NaN ``start`` and pools to 0 either way, see ``inside`` below).
  step = jnp.where(jnp.isnan(step), jnp.inf, step)
  c = start + step + _divide(i * bin_size, grid)                # [..., P, G]
  size = extent.astype(jnp.float32)[..., None, None]
  inside = (c >= -1.0) & (c <= size)
  # A sample outside gets weight 0 below, but 0 * NaN is NaN: move it to 0 so that a NaN
  # coordinate (a NaN box; never inside) reaches neither the weights nor the indices.
  c = jnp.where(inside, c, 0.0)
  # Clamping into [0, size - 1] reproduces torchvision's two border rules at once: samples in
  # [-1, 0) read pixel 0, samples in [size - 1, size] read pixel size - 1 with weight 1.
  c = jnp.clip(c, 0.0, size - 1.0)
  low = jnp.floor(c)
  frac = c - low                                                 # weight of the high corner
  low = low.astype(jnp.int32)
  high = jnp.minimum(low + 1, extent[..., None, None] - 1)
  index = jnp.stack([low, high], axis=-1)                        # [..., P, G, 2]
  weight = jnp.stack([1.0 - frac, frac], axis=-1) * inside[..., None]
  lead = index.shape[:-3]
  return (index.reshape(lead + (out_len * grid * 2,)),
          weight.reshape(lead + (out_len, grid * 2)))


def pool_corners(table: jax.Array, index: jax.Array, wy: jax.Array,
                 wx: jax.Array) -> jax.Array:
  """Weighted sum of the corner pixels of each RoI's sample grid.

  Args:
    table: [T, C] pixels.
    index: [..., oh*2g, ow*2g] int32 table rows: every row corner against every column corner.
    wy: [..., oh, 2g] float32 row weights (already divided by the g*g samples of a bin).
    wx: [..., ow, 2g] float32 column weights.

  Returns:
    [..., oh, ow, C] in ``table.dtype``:
    ``out[p, q] = sum_ij wy[p, i] * wx[q, j] * corner[p, i, q, j]``.

  The sum is written out term by term, one gather of [..., oh, ow] pixels per corner offset
  (i, j): a gather with a single consumer fuses into it, so XLA emits one loop that reads each
  corner pixel where it is used and writes only the result (one gather of all corners and a
  ``sum`` would materialise every corner, 4g^2 times the output).
  """
  oh, g2 = wy.shape[-2:]
  ow = wx.shape[-2]
  index = index.reshape(index.shape[:-2] + (oh, g2, ow, g2))
  out = None
  for i in range(g2):
    for j in range(g2):
      # Indices are in range by construction (clamped per map), so no bounds handling.
      corner = table.at[index[..., :, i, :, j]].get(mode="promise_in_bounds")
      # The corners are gathered in the features' dtype (bfloat16 maps move as bfloat16);
      # the weights and the sum are float32, so a bin's mean is not rounded 4 g^2 times.
      term = corner.astype(jnp.float32) * (wy[..., :, i, None, None] * wx[..., None, :, j, None])
      out = term if out is None else out + term
  return out.astype(table.dtype)


def pool_all_rois(tables: Sequence[jax.Array], level: jax.Array, index: jax.Array,
                  wy: jax.Array, wx: jax.Array) -> jax.Array:
  """:func:`pool_corners` of R RoIs, each from table ``tables[level[r]]``, in one gather.

  Args:
    tables: per level, [T_l, C] pixels.
    level: [R] int32, each RoI's table.
    index: [R, oh*2g, ow*2g] int32 rows of that table.
    wy, wx: [R, oh, 2g], [R, ow, 2g] float32 weights.

  Returns:
    [R, oh, ow, C] in the tables' dtype. The levels are concatenated and each RoI indexes the
    result at its level's offset.
  """
  offsets = np.concatenate([[0], np.cumsum([t.shape[0] for t in tables])[:-1]])
  table = jnp.concatenate(tables) if len(tables) > 1 else tables[0]
  index = index + jnp.asarray(offsets, jnp.int32)[level][:, None, None]
  return pool_corners(table, index, wy, wx)


def _pool_flat(tables: Sequence[jax.Array], level: jax.Array, boxes: jax.Array,
               base: jax.Array, height: jax.Array, width: jax.Array, scale: jax.Array,
               output_size: Tuple[int, int], sampling_ratio: int, aligned: bool,
               pool_rois: Optional[PoolRois]) -> jax.Array:
  """RoIAlign from flat pixel tables, each RoI with its own map geometry.

  Args:
    tables: per level, [B * Hl * Wl, C]: the level's pixels, image-major, row-major (NHWC).
    level: [B, N] int32, the table of each RoI.
    boxes: [B, N, 4] float32, xyxy pixels.
    base: [B, N] int32, row of that table holding pixel (0, 0) of the RoI's image.
    height, width: [B, N] int32, the size of the RoI's map.
    scale: [B, N] float32, its spatial scale (1 / stride).
    output_size, sampling_ratio, aligned, pool_rois: as ``roi_align``.

  Returns:
    [B, N, oh, ow, C] in the tables' dtype.
  """
  oh, ow = output_size
  g = sampling_ratio
  b, n = boxes.shape[:2]
  offset = 0.5 if aligned else 0.0
  x1 = boxes[..., 0] * scale - offset
  y1 = boxes[..., 1] * scale - offset
  roi_w = (boxes[..., 2] * scale - offset) - x1
  roi_h = (boxes[..., 3] * scale - offset) - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  rows, wy = _axis_samples(y1, roi_h, oh, g, height)    # [B,N,oh*2g], [B,N,oh,2g]
  cols, wx = _axis_samples(x1, roi_w, ow, g, width)     # [B,N,ow*2g], [B,N,ow,2g]
  # The bin value is the *mean* over its g*g samples; fold 1/(g*g) into the row weights.
  wy = wy / float(g * g)
  # Every row index against every column index: [B, N, oh*2g, ow*2g] table rows.
  index = (base[..., None, None] + rows[..., :, None] * width[..., None, None]
           + cols[..., None, :])
  pool = pool_all_rois if pool_rois is None else pool_rois
  out = pool(list(tables), level.reshape(b * n), index.reshape((b * n,) + index.shape[2:]),
                     wy.reshape(b * n, oh, 2 * g), wx.reshape(b * n, ow, 2 * g))
  return out.reshape(b, n, oh, ow, tables[0].shape[-1])


def roi_align(features: ArrayLike, boxes: ArrayLike, output_size: OutputSize, *,
              spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = True, pool_rois: Optional[PoolRois] = None) -> jax.Array:
  """Pools each box of each image to a fixed grid, as ``torchvision.ops.roi_align``.

  Args:
    features: [B, H, W, C] feature map (any float dtype; the output has the same dtype).
    boxes: [B, N, 4] float32, xyxy pixels of the image the map was computed from; box ``n`` of
      image ``b`` is pooled from ``features[b]`` (torchvision takes NCHW and a list of
      per-image boxes; this is the same thing with static shapes).
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: map pixels per image pixel (1 / stride).
    sampling_ratio: samples per bin along each axis, >= 1 (torchvision's adaptive
      ``<= 0`` has a data-dependent shape and raises ``ValueError``).
    aligned: shift the box by -0.5 map pixel, the correct alignment (True) or the legacy
      Mask R-CNN behaviour (False).
    pool_rois: the pooling of all RoIs (:func:`pool_all_rois`, the default, or a platform
      kernel with its signature and values).

  Returns:
    [B, N, oh, ow, C] in ``features.dtype``.
  """
  check_shape("features", features, 4)
  check_shape("boxes", boxes, 3, (None, 4))
  features = jnp.asarray(features)
  boxes = jnp.asarray(boxes, jnp.float32)
  if boxes.shape[0] != features.shape[0]:
    raise ValueError(f"boxes {boxes.shape} and features {features.shape} must have the same "
                     "batch size")
  g = _check_sampling_ratio(sampling_ratio)
  b, h, w, c = features.shape
  n = boxes.shape[1]
  table = features.reshape(b * h * w, c)
  base = jnp.broadcast_to((jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None], (b, n))
  full = lambda v, dt: jnp.full((b, n), v, dt)
  return _pool_flat([table], full(0, jnp.int32), boxes, base, full(h, jnp.int32),
                    full(w, jnp.int32),
                    full(spatial_scale, jnp.float32), _pair(output_size), g, aligned,
                    pool_rois)


def assign_fpn_levels(boxes: ArrayLike, min_level: int, max_level: int,
                      canonical_scale: float = 224, canonical_level: int = 4) -> jax.Array:
  """FPN level of each box (FPN paper eq. 1), as torchvision's ``LevelMapper``.

  ``k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)``, clamped to
  ``[min_level, max_level]``: a 224 x 224 box goes to level 4 (stride 16), each halving of
  its side one level down.

  Args:
    boxes: [..., 4] float32, xyxy pixels.
    min_level, max_level: the pyramid's levels, ``log2(stride)`` (2 and 5 for P2-P5).

  Returns:
    [...] int32 levels in ``[min_level, max_level]`` (the level itself, not an index).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape [..., 4], got shape {boxes.shape}")
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  k = jnp.floor(canonical_level + jnp.log2(jnp.sqrt(area) / canonical_scale)
                + jnp.float32(1e-6))
  # A degenerate (zero-area) box gives -inf, clamped to min_level as in torchvision.
  return jnp.clip(k, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(features: Sequence[ArrayLike], boxes: ArrayLike,
                         output_size: OutputSize, *, strides: Sequence[int],
                         sampling_ratio: int = 2, aligned: bool = False,
                         canonical_scale: float = 224, canonical_level: int = 4,
                         pool_rois: Optional[PoolRois] = None) -> jax.Array:
  """RoIAlign of each box on its FPN level, as ``torchvision.ops.MultiScaleRoIAlign``.

  Args:
    features: list of [B, Hl, Wl, C] maps, finest first (P2, P3, ...), one dtype.
    boxes: [B, N, 4] float32, xyxy image pixels.
    output_size: ``oh`` or ``(oh, ow)``.
    strides: stride of each map, powers of two in increasing order (e.g. (4, 8, 16, 32));
      level ``l = log2(stride)``, the scale is ``1 / stride``.
    sampling_ratio: samples per bin along each axis, >= 1.
    aligned: as ``roi_align`` (torchvision's MultiScaleRoIAlign uses False).
    canonical_scale, canonical_level: FPN eq. 1 (``assign_fpn_levels``).
    pool_rois: as ``roi_align``.

  Returns:
    [B, N, oh, ow, C] in the features' dtype.
  """
  if len(features) != len(strides) or not features:
    raise ValueError(f"need one stride per feature map, got {len(features)} maps and "
                     f"strides {tuple(strides)}")
  features = [jnp.asarray(f) for f in features]
  for i, f in enumerate(features):
    check_shape(f"features[{i}]", f, 4)
  check_shape("boxes", boxes, 3, (None, 4))
  boxes = jnp.asarray(boxes, jnp.float32)
  b, n = boxes.shape[:2]
  c = features[0].shape[-1]
  for i, f in enumerate(features):
    if f.shape[0] != b or f.shape[-1] != c:
      raise ValueError(f"features[{i}] has shape {f.shape}; expected batch {b} and {c} "
                       "channels")
  levels = [int(round(math.log2(s))) for s in strides]
  if any(2**l != s for l, s in zip(levels, strides)) or levels != list(
      range(levels[0], levels[0] + len(levels))):
    raise ValueError(f"strides must be consecutive powers of two, got {tuple(strides)}")
  g = _check_sampling_ratio(sampling_ratio)

  # One table per level, images stacked: [B * Hl * Wl, C].
  tables = [f.reshape(-1, c) for f in features]
  level_pixels = jnp.asarray([f.shape[1] * f.shape[2] for f in features], jnp.int32)
  level_h = jnp.asarray([f.shape[1] for f in features], jnp.int32)
  level_w = jnp.asarray([f.shape[2] for f in features], jnp.int32)
  level_scale = jnp.asarray([1.0 / s for s in strides], jnp.float32)

  k = assign_fpn_levels(boxes, levels[0], levels[-1], canonical_scale,
                        canonical_level) - levels[0]                          # [B, N]
  base = jnp.arange(b, dtype=jnp.int32)[:, None] * level_pixels[k]
  return _pool_flat(tables, k, boxes, base, level_h[k], level_w[k], level_scale[k],
                    _pair(output_size), g, aligned, pool_rois)
