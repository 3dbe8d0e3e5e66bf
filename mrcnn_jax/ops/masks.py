"""Instance-mask ops: training targets from cropped GT masks, and pasting predictions.

Ground-truth masks are carried *cropped to their box* at a fixed ``S x S`` resolution (as TF's
TPU Mask R-CNN does) rather than as one full-image mask per instance, so a batch costs
``G * S * S`` instead of ``G * H * W``. Both ops are written for one image (``jax.vmap`` them
for a batch) and are static-shape ``jnp``: every output pixel is a fixed interpolation of the
input, expressed as separable weights (rows then columns), never a data-dependent crop.

Coordinates follow the sampling convention of the torchvision op each one reproduces:

* ``mask_targets`` = ``roi_align(full_image_mask, roi, (size, size), spatial_scale=1,
  aligned=False)``, the target of torchvision's ``project_masks_on_boxes``. There, a sample
  point ``x`` reads the image's pixels as if pixel ``k`` sat at ``x = k``. The cropped mask's
  pixel ``a`` covers ``[gx1 + a gw / S, gx1 + (a + 1) gw / S]`` of the box; in the same
  convention it sits at ``gx1 + (a + 0.5) gw / S - 0.5``, so a sample ``x`` maps to

      u = (x + 0.5 - gx1) * S / gw - 0.5,

  read with bilinear weights ``max(0, 1 - |u - a|)`` and zeros beyond the crop (the mask is 0
  outside its box). For a box with integer corners and ``S = gw`` this is ``u = x - gx1``:
  exactly torchvision's bilinear read of the full-image mask, image borders aside (torchvision
  clamps to the edge pixel there; here a mask touching the image border fades to 0 over the
  last half pixel).
* ``paste_masks`` = ``torchvision.models.detection.roi_heads.paste_masks_in_image``: pad the
  ``M x M`` mask by one zero pixel, grow the box by ``(M + 2) / M`` about its centre, truncate
  it to integers, resize the padded mask to the box with ``F.interpolate(bilinear,
  align_corners=False)`` and place it in the image.

Both take ``aligned``. torchvision's pair (``aligned=False``, the default) does not invert: the
target is read half a pixel off and the paste stretches the mask over ``x1 - x0 + 1`` pixels
of a truncated box, so even a perfect 28x28 prediction at the exact GT box comes back shifted
and up to a pixel too large. ``aligned=True`` is the half-pixel-exact pair, Detectron2's:

* ``mask_targets(aligned=True)`` = ``roi_align(full_image_mask, roi, (size, size), 1,
  aligned=True)``: the sample ``x`` above moves by ``-0.5`` (pixel ``k`` covers ``[k, k + 1]``)
  and the RoI is not forced to one pixel;
* ``paste_masks(aligned=True)`` reads mask cell ``u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5`` at
  each image pixel centre ``x + 0.5`` of the float box, bilinear with zeros beyond the mask
  (Detectron2's ``paste_masks_in_image``: ``grid_sample(align_corners=False)``).

For objects a few dozen pixels wide that caps the mask IoU well below 1 (figures:
docs/benchmarks.md, "Main job").
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from mrcnn_jax.ops._checks import check_shape

ArrayLike = jax.typing.ArrayLike
ImageSize = Union[Tuple[int, int], Sequence[int]]


def _hat_weights(u: jax.Array, n: int) -> jax.Array:
  """Bilinear weights of sample positions ``u`` [..., K] over ``n`` pixels: [..., K, n].

  ``max(0, 1 - |u - a|)`` is the linear-interpolation weight of pixel ``a`` at ``u``; pixels
  beyond ``[0, n)`` are simply absent, i.e. read as zero.
  """
  a = jnp.arange(n, dtype=jnp.float32)
  return jnp.maximum(1.0 - jnp.abs(u[..., None] - a), 0.0)


def _roi_axis_weights(lo, hi, g_lo, g_hi, s: int, size: int, sampling_ratio: int,
                      aligned: bool):
  """Averaged bilinear weights of one axis: [R, size, s].

  Each bin averages ``n = clip(ceil(bin_len), 1, sampling_ratio)`` samples, torchvision's
  adaptive ``ceil(roi_side / size)`` capped at the ``sampling_ratio`` static sample slots
  (slots ``k >= n`` get zero weight).

  Args:
    lo, hi: [R] float32, the RoI's extent on this axis (image pixels).
    g_lo, g_hi: [R] float32, the matched GT box's extent on this axis.
    s: static int, the cropped mask's resolution.
    size: static int, output bins.
    sampling_ratio: static int, the most samples per bin on this axis.
    aligned: static bool, roi_align's ``aligned`` (module docstring).
  """
  if aligned:  # pixel k covers [k, k + 1]: move the RoI by -0.5 into pixel-index coordinates
    lo, hi = lo - 0.5, hi - 0.5
    length = hi - lo
  else:  # roi_align with aligned=False: the RoI is at least one pixel long.
    length = jnp.maximum(hi - lo, 1.0)
  bin_len = length / size
  # torchvision's kernel: grid = ceil(roi_height / pooled_height), i.e. ceil(bin_len); capped
  # at the sampling_ratio slots that the static shapes provide.
  n = jnp.clip(jnp.ceil(bin_len), 1.0, sampling_ratio)[:, None, None]  # [R, 1, 1]
  p = jnp.arange(size, dtype=jnp.float32)[:, None]
  k = jnp.arange(sampling_ratio, dtype=jnp.float32)[None, :]
  # Same evaluation order as torchvision's kernel: start + p * bin + (k + .5) * bin / grid.
  x = (lo[:, None, None] + p * bin_len[:, None, None]
       + (k + 0.5) * bin_len[:, None, None] / n)  # [R, size, sr]
  g_len = g_hi - g_lo
  scale = jnp.where(g_len > 0, s / jnp.where(g_len > 0, g_len, 1.0), 0.0)
  u = (x + 0.5 - g_lo[:, None, None]) * scale[:, None, None] - 0.5
  used = (k < n)[..., None]  # [R, 1, sr, 1]: the first n slots of each bin
  w = jnp.sum(_hat_weights(u, s) * used, axis=2) / n  # [R, size, s]
  # An empty GT box has no mask at all.
  return w * (g_len > 0)[:, None, None]


def mask_targets(gt_masks: ArrayLike, gt_boxes: ArrayLike, rois: ArrayLike,
                 matched_idx: ArrayLike, size: int = 28, *,
                 sampling_ratio: int = 2, aligned: bool = False) -> jax.Array:
  """Mask-head training targets: each RoI's matched GT mask resampled into ``size x size``.

  Equal to torchvision's ``project_masks_on_boxes``, i.e. ``roi_align(full_image_masks, rois,
  (size, size), spatial_scale=1, aligned=False)``, computed from masks cropped to their boxes.
  Like torchvision, each bin averages ``ceil(side / size)`` bilinear samples along each axis
  (``side`` the RoI's length on that axis, forced to >= 1 pixel), but no more than
  ``sampling_ratio``, which keeps the shapes static. The two therefore agree for every RoI
  whose sides are at most ``sampling_ratio * size`` pixels (56 at the defaults: most
  foreground RoIs of small and medium objects). Along a longer side each bin takes
  ``sampling_ratio`` samples instead of ``ceil(side / size)`` (as ``roi_align`` with that
  fixed ``sampling_ratio`` does), which only blurs the target's edge a little.
  ``aligned=True`` is ``roi_align(..., aligned=True)`` instead (the module docstring).

  Args:
    gt_masks: [G, S, S] float32 (or bool/uint8) masks, each cropped to its GT box and
      resized to ``S x S``.
    gt_boxes: [G, 4] float32, xyxy pixels, the boxes the masks were cropped to.
    rois: [R, 4] float32, xyxy pixels.
    matched_idx: [R] int, the GT index of each RoI; negative gives an all-zero target.
    size: static int, output resolution.
    sampling_ratio: static int >= 1, the most bilinear samples per bin and axis.
    aligned: static bool, the half-pixel-exact convention (True) or torchvision's (False).

  Returns:
    [R, size, size] float32 targets in ``[0, 1]`` (soft at mask edges; not thresholded, as
    in torchvision).
  """
  gt_masks = jnp.asarray(gt_masks)
  gt_boxes, rois = jnp.asarray(gt_boxes), jnp.asarray(rois)
  matched_idx = jnp.asarray(matched_idx)
  check_shape("gt_masks", gt_masks, 3)
  check_shape("gt_boxes", gt_boxes, 2, (4,))
  check_shape("rois", rois, 2, (4,))
  check_shape("matched_idx", matched_idx, 1)
  g, s, s2 = gt_masks.shape
  if s != s2 or gt_boxes.shape[0] != g or matched_idx.shape[0] != rois.shape[0]:
    raise ValueError(f"inconsistent shapes: gt_masks {gt_masks.shape}, gt_boxes "
                     f"{gt_boxes.shape}, rois {rois.shape}, matched_idx {matched_idx.shape}")
  if sampling_ratio < 1:
    raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
  if g == 0:
    return jnp.zeros((rois.shape[0], size, size), jnp.float32)
  return _mask_targets(gt_masks, gt_boxes, rois, matched_idx, int(size), int(sampling_ratio),
                       bool(aligned))


# Jitted so that eager (notebook) calls run as one compiled program, not op by op.
@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _mask_targets(gt_masks, gt_boxes, rois, matched_idx, size, sampling_ratio, aligned):
  s = gt_masks.shape[1]
  gt_masks = gt_masks.astype(jnp.float32)
  gt_boxes, rois = gt_boxes.astype(jnp.float32), rois.astype(jnp.float32)
  matched = matched_idx >= 0
  idx = jnp.where(matched, matched_idx, 0).astype(jnp.int32)
  gb = gt_boxes[idx]  # [R, 4]
  wy = _roi_axis_weights(rois[:, 1], rois[:, 3], gb[:, 1], gb[:, 3], s, size, sampling_ratio,
                         aligned)
  wx = _roi_axis_weights(rois[:, 0], rois[:, 2], gb[:, 0], gb[:, 2], s, size, sampling_ratio,
                         aligned)
  wy = wy * matched[:, None, None]
  # Rows first: [R, size, S] @ [R, S, S] -> [R, size, S], then columns -> [R, size, size].
  hp = jax.lax.Precision.HIGHEST  # exact float32 sums (TPU matmuls default to bfloat16)
  rows = jnp.einsum("ria,rab->rib", wy, gt_masks[idx], precision=hp)
  return jnp.einsum("rib,rjb->rij", rows, wx, precision=hp)


def _resize_taps(n_out_box, start, out_len: int, n_in: int):
  """torchvision's bilinear (align_corners=False) taps of every output pixel on one axis.

  Args:
    n_out_box: [N] int32, the box length the mask is resized to (>= 1).
    start: [N] int32, the box's first pixel.
    out_len: static int, image length on this axis.
    n_in: static int, the (padded) mask length.

  Returns:
    (i0, i1, l0, l1, inside): [N, out_len] low/high source index, their weights, and whether
    the output pixel lies in the box.
  """
  pix = jnp.arange(out_len, dtype=jnp.int32)[None, :]
  dst = pix - start[:, None]
  inside = (dst >= 0) & (dst < n_out_box[:, None])
  scale = jnp.float32(n_in) / n_out_box.astype(jnp.float32)
  src = scale[:, None] * (dst.astype(jnp.float32) + 0.5) - 0.5
  src = jnp.maximum(src, 0.0)
  i0 = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, n_in - 1)
  i1 = jnp.where(i0 < n_in - 1, i0 + 1, i0)
  l1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  return i0, i1, 1.0 - l1, l1, inside


def paste_masks(masks: ArrayLike, boxes: ArrayLike, image_size: ImageSize,
                padding: int = 1, *, aligned: bool = False) -> jax.Array:
  """Pastes ``M x M`` mask probabilities into the image at their boxes.

  Equal to ``torchvision.models.detection.roi_heads.paste_masks_in_image`` (probabilities;
  thresholding, usually at 0.5, is the caller's).

  Args:
    masks: [N, M, M] float32 mask probabilities of each box.
    boxes: [N, 4] float32, xyxy pixels of the image the masks are pasted into.
    image_size: static (h, w) ints.
    padding: static int, zero pixels added around each mask (torchvision uses 1) so that the
      pasted mask fades out at the box border.
    aligned: static bool; True pastes half-pixel exactly at the float box, as Detectron2
      (module docstring; ``padding`` is then unused: the mask fades out over its border cell).

  Returns:
    [N, h, w] float32; 0 outside each (grown, integer) box.
  """
  masks, boxes = jnp.asarray(masks), jnp.asarray(boxes)
  check_shape("masks", masks, 3)
  check_shape("boxes", boxes, 2, (4,))
  n, m, m2 = masks.shape
  if m != m2 or boxes.shape[0] != n:
    raise ValueError(f"masks must be [N, M, M] and boxes [N, 4], got {masks.shape} and "
                     f"{boxes.shape}")
  im_h, im_w = (int(v) for v in image_size)
  if aligned:
    return _paste_masks_aligned(masks, boxes, im_h, im_w)
  return _paste_masks(masks, boxes, im_h, im_w, int(padding))


def _cell_weights(lo, hi, m: int, out_len: int) -> jax.Array:
  """[N, out_len, m] bilinear weights of the mask cells read at each pixel centre of one axis.

  Pixel ``x`` (centre ``x + 0.5``) reads cell ``u = (x + 0.5 - lo) / (hi - lo) * m - 0.5``;
  beyond the mask's cells, and for an empty box, it reads zeros.
  """
  length = hi - lo
  scale = jnp.where(length > 0, m / jnp.where(length > 0, length, 1.0), 0.0)
  centres = jnp.arange(out_len, dtype=jnp.float32) + 0.5
  u = (centres[None, :] - lo[:, None]) * scale[:, None] - 0.5
  return _hat_weights(u, m) * (length > 0)[:, None, None]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _paste_masks_aligned(masks, boxes, im_h, im_w):
  m = masks.shape[1]
  boxes = boxes.astype(jnp.float32)
  wy = _cell_weights(boxes[:, 1], boxes[:, 3], m, im_h)  # [N, h, M]
  wx = _cell_weights(boxes[:, 0], boxes[:, 2], m, im_w)  # [N, w, M]
  hp = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("nia,nab->nib", wy, masks.astype(jnp.float32), precision=hp)
  return jnp.einsum("nib,njb->nij", rows, wx, precision=hp)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _paste_masks(masks, boxes, im_h, im_w, padding):
  m = masks.shape[1]
  masks = jnp.pad(masks.astype(jnp.float32), ((0, 0), (padding, padding), (padding, padding)))
  mp = m + 2 * padding
  # Grow the box by the padding, in torchvision's float32 order, then truncate toward zero.
  scale = jnp.float32((m + 2 * padding) / m)
  boxes = boxes.astype(jnp.float32)
  w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
  h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
  x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
  y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
  x0 = jnp.trunc(x_c - w_half).astype(jnp.int32)
  x1 = jnp.trunc(x_c + w_half).astype(jnp.int32)
  y0 = jnp.trunc(y_c - h_half).astype(jnp.int32)
  y1 = jnp.trunc(y_c + h_half).astype(jnp.int32)
  # The box covers pixels x0..x1 inclusive: the mask is resized to x1 - x0 + 1 (at least 1).
  bw = jnp.maximum(x1 - x0 + 1, 1)
  bh = jnp.maximum(y1 - y0 + 1, 1)
  # Pixels with x > x1 are outside even when the length was raised to 1.
  cx0, cx1, cl0, cl1, in_x = _resize_taps(bw, x0, im_w, mp)
  ry0, ry1, rl0, rl1, in_y = _resize_taps(bh, y0, im_h, mp)
  in_x = in_x & (jnp.arange(im_w)[None, :] <= x1[:, None])
  in_y = in_y & (jnp.arange(im_h)[None, :] <= y1[:, None])
  # Columns first, then rows: the order of torchvision's CPU kernel's sums.
  cols = (cl0[:, None, :] * jnp.take_along_axis(masks, cx0[:, None, :], axis=2)
          + cl1[:, None, :] * jnp.take_along_axis(masks, cx1[:, None, :], axis=2))  # [N, mp, w]
  out = (rl0[:, :, None] * jnp.take_along_axis(cols, ry0[:, :, None], axis=1)
         + rl1[:, :, None] * jnp.take_along_axis(cols, ry1[:, :, None], axis=1))  # [N, h, w]
  return jnp.where(in_y[:, :, None] & in_x[:, None, :], out, 0.0)
