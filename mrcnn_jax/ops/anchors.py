"""FPN anchors, laid out exactly as torchvision's ``AnchorGenerator`` lays them out.

Anchors depend only on the (static) padded input size, so they are computed once on the host
with numpy and enter the jitted model as constants. The order matters beyond taste: an RPN head
predicts ``A`` objectness logits and ``4 A`` deltas per feature-map position, and weights
converted from torchvision only line up if anchor ``k`` of a position is the same box there and
here. Within a level the order is position-major (row ``y``, then column ``x``) and
anchor-minor (aspect ratio outer, size inner), i.e. index ``(y * W + x) * A + a``.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import numpy as np

Sizes = Sequence[Sequence[float]]
Ratios = Union[Sequence[float], Sequence[Sequence[float]]]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float],
                 round_to_pixels: bool = True) -> np.ndarray:
  """Zero-centred anchors of one level.

  Aspect ratio is ``h / w``; each anchor keeps the area ``size ** 2``. Coordinates are rounded
  to whole pixels (half to even), as torchvision does, unless ``round_to_pixels`` is False
  (Detectron2's ``DefaultAnchorGenerator``, which computes them in float64).

  Args:
    sizes: the anchor sizes (sqrt of the area) of the level, in pixels.
    aspect_ratios: the ratios ``h / w``.
    round_to_pixels: round to whole pixels (torchvision) or not (Detectron2).

  Returns:
    [len(aspect_ratios) * len(sizes), 4] float32 xyxy, ratio-major, size-minor.
  """
  if not round_to_pixels:
    # Detectron2: w = sqrt(size**2 / ratio), h = ratio * w in float64, then float32. For one
    # size per level (FPN) its size-major order equals ours.
    s64 = np.asarray(sizes, np.float64)[None, :]
    r64 = np.asarray(aspect_ratios, np.float64)[:, None]
    ws = np.sqrt(s64**2 / r64)
    hs = r64 * ws
    return (np.stack([-ws, -hs, ws, hs], axis=-1).reshape(-1, 4) / 2.0).astype(np.float32)
  # float32 throughout, in torchvision's order of operations, so the rounding of the
  # half-sizes (e.g. 22.627417 for size 32 at ratio 0.5) lands on the same integers.
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
  return np.round(base).astype(np.float32)


def generate_anchors(
    image_size: Tuple[int, int],
    strides: Sequence[int] = (4, 8, 16, 32, 64),
    sizes: Sizes = ((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios: Ratios = (0.5, 1.0, 2.0),
    round_to_pixels: bool = True,
    strides_from_grid: bool = False,
) -> List[np.ndarray]:
  """Anchors of every FPN level for a (padded) input of ``image_size``.

  Level ``l`` has a feature map of ``Hl = ceil(h / stride_l)`` by ``Wl = ceil(w / stride_l)``
  (what a stride-2 conv tower with "SAME" padding yields) and anchors centred at
  ``(x * stride_l, y * stride_l)``, the top-left corner of each cell, as in torchvision.

  torchvision does not take the strides as given: its ``AnchorGenerator`` derives them as
  ``image_size // feature_size`` per level and axis. With ``Hl = ceil(h / stride)`` that equals
  ``stride`` only when ``h`` (and ``w``) is a multiple of the stride; for an 800 x 1216 input
  (torchvision pads to 32) the P6 level (13 x 19 cells) gets strides ``800 // 13 = 61`` and
  ``1216 // 19 = 64``. ``strides_from_grid=True`` follows that rule (converted torchvision
  models set it); at multiples of the largest stride the two rules agree exactly.

  Args:
    image_size: ``(h, w)`` of the padded network input, static Python ints.
    strides: the stride of each level, in pixels.
    sizes: per level, the anchor sizes (sqrt of the area), in pixels.
    aspect_ratios: ratios ``h / w``: one sequence shared by all levels, or one per level.
    round_to_pixels: round the cell anchors to whole pixels (torchvision) or not (Detectron2,
      whose grid is otherwise the same: offset 0, the given strides).
    strides_from_grid: space each level's anchors ``h // Hl`` and ``w // Wl`` apart
      (torchvision) instead of ``stride`` (Detectron2); the grid sizes are the same.

  Returns:
    A list with one entry per level: np.ndarray [Hl * Wl * A, 4] float32, xyxy pixels, where
    ``A = len(sizes[l]) * len(aspect_ratios[l])``; index ``(y * Wl + x) * A + a``.

  Raises:
    ValueError: on malformed sizes, strides or ratios.
  """
  if len(image_size) != 2:
    raise ValueError(f"image_size must be (h, w), got {image_size}")
  height, width = (int(v) for v in image_size)
  if height <= 0 or width <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if len(sizes) != len(strides):
    raise ValueError(
        f"need one sizes entry per stride, got {len(sizes)} for {len(strides)} strides")
  if not all(isinstance(s, (list, tuple)) for s in sizes):
    raise ValueError(f"sizes must be a sequence of per-level sequences, got {sizes}")
  if len(aspect_ratios) and all(isinstance(r, (list, tuple)) for r in aspect_ratios):
    per_level_ratios = [tuple(r) for r in aspect_ratios]
    if len(per_level_ratios) != len(strides):
      raise ValueError(
          f"need one aspect_ratios entry per stride, got {len(per_level_ratios)} for "
          f"{len(strides)} strides")
  else:
    per_level_ratios = [tuple(aspect_ratios)] * len(strides)

  anchors = []
  for stride, level_sizes, ratios in zip(strides, sizes, per_level_ratios):
    stride = int(stride)
    if stride <= 0:
      raise ValueError(f"strides must be positive, got {strides}")
    base = cell_anchors(level_sizes, ratios, round_to_pixels)  # [A, 4]
    grid_h = math.ceil(height / stride)
    grid_w = math.ceil(width / stride)
    step_y, step_x = (height // grid_h, width // grid_w) if strides_from_grid else (stride,) * 2
    # Integer shifts, as torchvision computes them, then one exact float32 addition.
    shift_x = np.arange(grid_w, dtype=np.int32) * step_x
    shift_y = np.arange(grid_h, dtype=np.int32) * step_y
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    sx = sx.reshape(-1)
    sy = sy.reshape(-1)
    shifts = np.stack([sx, sy, sx, sy], axis=1).astype(np.float32)  # [Hl * Wl, 4]
    anchors.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
  return anchors


def num_anchors_per_location(
    sizes: Sizes = ((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios: Ratios = (0.5, 1.0, 2.0),
) -> List[int]:
  """``A`` of each level for the same ``sizes``/``aspect_ratios`` as ``generate_anchors``."""
  if len(aspect_ratios) and all(isinstance(r, (list, tuple)) for r in aspect_ratios):
    return [len(s) * len(r) for s, r in zip(sizes, aspect_ratios)]
  return [len(s) * len(aspect_ratios) for s in sizes]
