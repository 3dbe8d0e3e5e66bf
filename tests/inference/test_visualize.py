"""Overlays: each instance tinted in its own colour, boxes drawn, PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mrcnn_jax.inference import visualize


def test_each_instance_gets_its_own_tint_and_a_box(tmp_path):
  image = np.full((60, 80, 3), 40, np.uint8)
  masks = np.zeros((2, 60, 80), bool)
  masks[0, 30:50, 5:25] = True
  masks[1, 30:50, 50:75] = True
  boxes = np.array([[5, 30, 25, 50], [50, 30, 75, 50]], np.float32)
  out = visualize.draw_instances(image, boxes, np.array([0.9, 0.8]), ["circle", "square"], masks)
  assert out.shape == image.shape and out.dtype == np.uint8
  colors = visualize.instance_colors(2)
  inside0, inside1 = out[40, 15].astype(int), out[40, 62].astype(int)
  assert not np.array_equal(inside0, inside1)
  # The tint moves each mask's pixels toward its own colour.
  for inside, color in ((inside0, colors[0]), (inside1, colors[1])):
    assert np.abs(inside - color.astype(int)).sum() < np.abs(40 - color.astype(int)).sum()
  np.testing.assert_array_equal(out[5, 40], image[5, 40])  # background untouched
  np.testing.assert_array_equal(out[40, 5], colors[0])  # box outline in the instance colour
  path = str(tmp_path / "o.png")
  visualize.save_png(out, path)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), out)


def test_no_instances_and_bad_shapes():
  image = np.zeros((10, 12, 3), np.uint8)
  out = visualize.draw_instances(image, np.zeros((0, 4)), np.zeros(0), [], np.zeros((0, 10, 12)))
  np.testing.assert_array_equal(out, image)
  with pytest.raises(ValueError, match="masks must be"):
    visualize.draw_instances(image, np.zeros((1, 4)), np.ones(1), ["a"], np.zeros((1, 5, 5)))
  with pytest.raises(ValueError, match="image must be"):
    visualize.draw_instances(image[..., 0], np.zeros((0, 4)), np.zeros(0), [])


def test_upscale_and_grid():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  masks = np.array([[[True, False, False], [False, False, True]]])
  big, boxes, big_masks = visualize.upscale(image, np.array([[0, 0, 1, 2]]), masks, 2)
  assert big.shape == (4, 6, 3) and big_masks.shape == (1, 4, 6)
  np.testing.assert_array_equal(big[::2, ::2], image)
  np.testing.assert_array_equal(big_masks[0, ::2, ::2], masks[0])
  np.testing.assert_array_equal(boxes, [[0, 0, 2, 4]])
  grid = visualize.make_grid([image, big], cols=2, pad=1)
  assert grid.shape == (1 + 4 + 1, 1 + 2 * 7, 3)
  np.testing.assert_array_equal(grid[1:3, 1:4], image)
  np.testing.assert_array_equal(grid[1:5, 8:14], big)
