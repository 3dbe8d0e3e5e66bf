"""Tests for mrcnn_jax.ops.anchors against torchvision's AnchorGenerator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mrcnn_jax.ops import anchors as A


def torchvision_anchors(image_size, strides, sizes, aspect_ratios):
  """Per-level anchors from torchvision for a padded image of ``image_size``."""
  h, w = image_size
  generator = AnchorGenerator(sizes=sizes, aspect_ratios=aspect_ratios)
  images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
  features = [torch.zeros(1, 1, math.ceil(h / s), math.ceil(w / s)) for s in strides]
  flat = generator(images, features)[0].numpy()
  counts = [f.shape[-2] * f.shape[-1] * n for f, n in
            zip(features, generator.num_anchors_per_location())]
  return np.split(flat, np.cumsum(counts)[:-1])


@pytest.mark.parametrize("image_size", [(64, 64), (128, 192), (320, 256), (64, 448)])
def test_default_fpn_anchors_match_torchvision(image_size):
  strides = (4, 8, 16, 32, 64)
  sizes = ((32,), (64,), (128,), (256,), (512,))
  ratios = (0.5, 1.0, 2.0)
  got = A.generate_anchors(image_size)
  ref = torchvision_anchors(image_size, strides, sizes, (ratios,) * len(sizes))
  assert len(got) == len(ref) == 5
  for level, (g, r, s) in enumerate(zip(got, ref, strides)):
    n = math.ceil(image_size[0] / s) * math.ceil(image_size[1] / s) * 3
    assert isinstance(g, np.ndarray) and g.dtype == np.float32, level
    assert g.shape == r.shape == (n, 4), level
    np.testing.assert_array_equal(g, r, err_msg=f"level {level}")


@pytest.mark.parametrize("image_size", [(96, 160), (800, 1216), (224, 200)])
def test_sizes_off_the_largest_stride_match_torchvision_with_strides_from_grid(image_size):
  """torchvision spaces the anchors (padded size) // (grid size) apart: P6 of a 96-high input
  has 2 rows 48 px apart, not 64. ``strides_from_grid`` reproduces it; the fixed strides do
  not (the grids are the same size either way)."""
  strides = (4, 8, 16, 32, 64)
  sizes = ((32,), (64,), (128,), (256,), (512,))
  got = A.generate_anchors(image_size, strides_from_grid=True)
  fixed = A.generate_anchors(image_size)
  ref = torchvision_anchors(image_size, strides, sizes, ((0.5, 1.0, 2.0),) * len(sizes))
  for level, (g, r) in enumerate(zip(got, ref)):
    np.testing.assert_array_equal(g, r, err_msg=f"level {level}")
  assert fixed[-1].shape == ref[-1].shape and not np.array_equal(fixed[-1], ref[-1])


def test_custom_sizes_and_per_level_ratios_match_torchvision():
  image_size = (128, 64)
  strides = (8, 16, 32)
  sizes = ((16, 24), (40,), (64, 100, 181))
  ratios = ((0.5, 1.0, 2.0), (0.25, 1.0, 3.0, 1.7), (1.0,))
  got = A.generate_anchors(image_size, strides=strides, sizes=sizes, aspect_ratios=ratios)
  ref = torchvision_anchors(image_size, strides, sizes, ratios)
  assert A.num_anchors_per_location(sizes, ratios) == [6, 4, 3]
  for level, (g, r) in enumerate(zip(got, ref)):
    np.testing.assert_array_equal(g, r, err_msg=f"level {level}")


def test_shared_ratios_with_several_sizes_match_torchvision():
  image_size = (96, 160)
  strides = (16, 32)
  sizes = ((32, 64), (128, 256))
  ratios = (0.5, 1.0, 2.0)
  got = A.generate_anchors(image_size, strides=strides, sizes=sizes, aspect_ratios=ratios)
  ref = torchvision_anchors(image_size, strides, sizes, (ratios, ratios))
  assert A.num_anchors_per_location(sizes, ratios) == [6, 6]
  for g, r in zip(got, ref):
    np.testing.assert_array_equal(g, r)


def test_order_is_position_major_anchor_minor():
  # 3 ratios per position; anchor (y * W + x) * A + a sits at (x * stride, y * stride).
  stride = 16
  (level,) = A.generate_anchors((48, 80), strides=(stride,), sizes=((32,),))
  grid_h, grid_w, num_a = 3, 5, 3
  assert level.shape == (grid_h * grid_w * num_a, 4)
  per_pos = level.reshape(grid_h, grid_w, num_a, 4)
  centres = (per_pos[..., :2] + per_pos[..., 2:]) / 2
  ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  want_x = np.repeat(xs[..., None] * stride, num_a, -1)
  want_y = np.repeat(ys[..., None] * stride, num_a, -1)
  np.testing.assert_allclose(centres[..., 0], want_x, atol=0.5)
  np.testing.assert_allclose(centres[..., 1], want_y, atol=0.5)
  # Ratio 0.5 (h / w) first: wider than tall; ratio 2 last: taller than wide.
  wh = per_pos[0, 0, :, 2:] - per_pos[0, 0, :, :2]
  assert wh[0, 0] > wh[0, 1] and wh[1, 0] == wh[1, 1] and wh[2, 0] < wh[2, 1]
  np.testing.assert_array_equal(per_pos[0, 0, 1], [-16, -16, 16, 16])


def test_grid_uses_ceil_for_sizes_not_multiple_of_stride():
  levels = A.generate_anchors((100, 70), strides=(8, 64), sizes=((32,), (512,)))
  assert levels[0].shape == (13 * 9 * 3, 4)
  assert levels[1].shape == (2 * 2 * 3, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(image_size=(64,)),
        dict(image_size=(0, 64)),
        dict(image_size=(64, 64), strides=(4, 8), sizes=((32,),)),
        dict(image_size=(64, 64), strides=(4,), sizes=(32,)),
        dict(image_size=(64, 64), strides=(4, 8), sizes=((32,), (64,)),
             aspect_ratios=((1.0,),)),
        dict(image_size=(64, 64), strides=(0,), sizes=((32,),)),
    ],
)
def test_bad_arguments_raise(kwargs):
  with pytest.raises(ValueError):
    A.generate_anchors(**kwargs)
