"""Host-side mask post-processing shared by the predictor and COCO evaluation.

A predicted 28x28 mask probability map lives in its box's frame; images come in any size, so the
pasting runs on the host in numpy, per detection (inside ``jit`` it would compile once per
original image size), exactly as torchvision's ``paste_masks_in_image`` (1-pixel zero padding,
box expanded to match, bilinear resize with ``align_corners=False`` onto the integer box), or,
for models with ``mask.aligned``, half-pixel exactly at the float box (``ops.masks``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as mask_util

__all__ = ["encode_mask", "paste_mask", "paste_mask_aligned"]


# torch's CPU bilinear kernel takes its channels-last loop (four products summed in one
# expression) when out_h + out_w <= 128 and its separable loop otherwise: they round differently.
_TORCH_CHANNELS_LAST_MAX_OUT = 128


def _fma32(a, b, c) -> np.ndarray:
  """``a * b + c`` rounded once to float32, as a fused multiply-add (float32 inputs).

  In float64 ``a * b`` is exact and ``s + e`` (TwoSum) is the exact sum; rounding ``s`` to
  float32 is then right except where ``s`` is a float32 midpoint, a tie that ``e`` breaks.
  """
  a, b, c = (np.asarray(v, np.float32) for v in (a, b, c))
  prod = a.astype(np.float64) * b
  c64 = c.astype(np.float64)
  s = prod + c64
  t = s - prod
  e = (prod - (s - t)) + (c64 - t)
  r = s.astype(np.float32)
  r64 = r.astype(np.float64)
  other = np.nextafter(r, np.where(s > r64, np.inf, -np.inf).astype(np.float32))
  other64 = other.astype(np.float64)
  tie = ((r64 + other64) * 0.5 == s) & (e != 0) & (np.sign(e) == np.sign(other64 - r64))
  return np.where(tie, other, r)


def _linear_taps(in_size: int, out_size: int, start: int, stop: int):
  """Taps of ``F.interpolate(bilinear, align_corners=False)`` for outputs ``start..stop-1``.

  float32 throughout, as torch's CPU ``compute_source_index_and_lambda``: scale ``in / out``,
  source ``scale * (i + 0.5) - 0.5`` (one fused multiply-add) clamped at 0, low index ``floor``
  (at most ``in - 1``), ``lambda1 = src - low`` in ``[0, 1]``, ``lambda0 = 1 - lambda1``.

  Returns:
    (i0, i1, l0, l1): [stop - start] int low/high source indices and float32 weights.
  """
  dst = np.arange(start, stop)
  if in_size == out_size:  # torch copies: index i, weights (1, 0)
    return dst, dst, np.ones(dst.shape, np.float32), np.zeros(dst.shape, np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  src = _fma32(scale, dst.astype(np.float32) + np.float32(0.5), np.float32(-0.5))
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  return i0, i1, np.float32(1.0) - l1, l1


def paste_mask(mask: np.ndarray, box_xyxy: np.ndarray, image_size: Sequence[int], *,
               aligned: bool = False) -> np.ndarray:
  """Pastes one mask probability map into an image, as torchvision's ``paste_masks_in_image``.

  Bit for bit torchvision's float32 arithmetic on the CPU: the box grown by ``(M + 2) / M``
  about its centre and truncated to integers, the zero-padded mask resized onto it with the
  taps and the order of products and sums of torch's CPU ``upsample_bilinear2d``, including the
  fused multiply-adds its x86-64 wheels' AVX2/AVX512 kernels are compiled to; only the rows and
  columns inside the image are computed. (torch's CUDA kernel, or a CPU build without FMA,
  rounds differently: its results can differ in the last bit.)

  Args:
    mask: [M, M] float, probabilities in the box's frame.
    box_xyxy: [4] float, the box in pixels of the target image.
    image_size: (height, width) of the target image.
    aligned: paste as :func:`paste_mask_aligned` instead (the model's ``mask.aligned``).

  Returns:
    [height, width] float32 probabilities, zero outside the (expanded) box.
  """
  if aligned:
    return paste_mask_aligned(mask, box_xyxy, image_size)
  mask = np.asarray(mask, np.float32)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"mask must be square [M, M], got shape {mask.shape}")
  im_h, im_w = int(image_size[0]), int(image_size[1])
  m = mask.shape[0]
  padded = np.pad(mask, 1)  # one pixel of zeros, so the pasted mask fades out at the box edge
  # torchvision's expand_boxes in float32 and its order; its Python-float scale enters as float32.
  scale = np.float32((m + 2.0) / m)
  box = np.asarray(box_xyxy, np.float32)
  half = np.float32(0.5)
  half_w = (box[2] - box[0]) * half * scale
  half_h = (box[3] - box[1]) * half * scale
  cx = (box[2] + box[0]) * half
  cy = (box[3] + box[1]) * half
  # Truncation toward zero, as torchvision's `.to(torch.int64)`.
  x0, y0 = int(cx - half_w), int(cy - half_h)
  x1, y1 = int(cx + half_w), int(cy + half_h)
  w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)

  out = np.zeros((im_h, im_w), np.float32)
  cx0, cx1 = max(x0, 0), min(x1 + 1, im_w)
  cy0, cy1 = max(y0, 0), min(y1 + 1, im_h)
  if cx0 >= cx1 or cy0 >= cy1:
    return out
  yi0, yi1, yl0, yl1 = _linear_taps(m + 2, h, cy0 - y0, cy1 - y0)
  xi0, xi1, xl0, xl1 = _linear_taps(m + 2, w, cx0 - x0, cx1 - x0)
  yl0, yl1 = yl0[:, None], yl1[:, None]
  if h + w <= _TORCH_CHANNELS_LAST_MAX_OUT:
    # Channels-last loop: i00 * w00 + i01 * w01 + i10 * w10 + i11 * w11 (w00 = h0 * w0, ...),
    # left to right, compiled to fma(i00, w00, i01 * w01), then fma(i10, w10, .), fma(i11, ...).
    top, bottom = padded[yi0], padded[yi1]
    pasted = _fma32(top[:, xi0], yl0 * xl0, top[:, xi1] * (yl0 * xl1))
    pasted = _fma32(bottom[:, xi0], yl1 * xl0, pasted)
    pasted = _fma32(bottom[:, xi1], yl1 * xl1, pasted)
  else:
    # Separable loop: t0 * w0 + t1 * w1, compiled to fma(t0, w0, t1 * w1), along x for each
    # mask row, then along y over pairs of those rows.
    cols = _fma32(padded[:, xi0], xl0, padded[:, xi1] * xl1)  # [M + 2, visible width]
    pasted = _fma32(cols[yi0], yl0, cols[yi1] * yl1)
  out[cy0:cy1, cx0:cx1] = pasted
  return out


def _cell_taps(lo: float, hi: float, m: int, out_len: int):
  """The pixels ``start..stop-1`` of one axis that read a mask cell, and their [n, m] weights.

  Pixel ``x`` reads cell ``u = (x + 0.5 - lo) / (hi - lo) * m - 0.5`` bilinearly, zeros beyond
  the mask; it reads something where ``-1 < u < m``.
  """
  length = hi - lo
  half_cell = length / (2 * m)
  start = max(int(np.floor(lo - half_cell - 0.5)), 0)
  stop = min(int(np.ceil(hi + half_cell + 0.5)), out_len)
  centres = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
  u = (centres - np.float32(lo)) * np.float32(m / length) - np.float32(0.5)
  weights = np.maximum(np.float32(1.0) - np.abs(u[:, None] - np.arange(m, dtype=np.float32)),
                       np.float32(0.0))
  return start, stop, weights


def paste_mask_aligned(mask: np.ndarray, box_xyxy: np.ndarray,
                       image_size: Sequence[int]) -> np.ndarray:
  """Pastes one mask probability map half-pixel exactly at its float box (Detectron2's paste).

  Each image pixel centre ``(x + 0.5, y + 0.5)`` inside the box reads the ``M x M`` mask
  bilinearly at cell ``u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5`` (and likewise ``v``), zeros
  beyond the mask: ``grid_sample(align_corners=False)``. The host twin of
  ``ops.masks.paste_masks(aligned=True)``.

  Args:
    mask: [M, M] float, probabilities in the box's frame.
    box_xyxy: [4] float, the box in pixels of the target image.
    image_size: (height, width) of the target image.

  Returns:
    [height, width] float32 probabilities, zero outside the box (and an empty box).
  """
  mask = np.asarray(mask, np.float32)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"mask must be square [M, M], got shape {mask.shape}")
  im_h, im_w = int(image_size[0]), int(image_size[1])
  x1, y1, x2, y2 = (float(v) for v in np.asarray(box_xyxy, np.float32))
  out = np.zeros((im_h, im_w), np.float32)
  if not (x2 > x1 and y2 > y1):
    return out
  m = mask.shape[0]
  cx0, cx1, wx = _cell_taps(x1, x2, m, im_w)
  cy0, cy1, wy = _cell_taps(y1, y2, m, im_h)
  if cx0 < cx1 and cy0 < cy1:
    out[cy0:cy1, cx0:cx1] = wy @ mask @ wx.T
  return out


def encode_mask(binary_mask: np.ndarray) -> dict:
  """[H, W] bool -> COCO compressed RLE with a ``str`` counts field (JSON-serialisable)."""
  rle = mask_util.encode(np.asfortranarray(binary_mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle
