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


def _duplicate_scene():
  """A circle detected twice (as circle 0.9 and square 0.6) and a separate square 0.8."""
  image = np.full((60, 80, 3), 40, np.uint8)
  masks = np.zeros((3, 60, 80), bool)
  yy, xx = np.mgrid[:60, :80]
  masks[0] = (yy - 30) ** 2 + (xx - 20) ** 2 <= 100
  masks[1] = masks[0].copy()
  masks[1, 20:22, 10:30] = True  # nearly the same pixels
  masks[2, 20:40, 50:70] = True
  boxes = np.array([[10, 20, 30, 40], [10, 20, 30, 40], [50, 20, 70, 40]], np.float32)
  return image, boxes, np.array([0.9, 0.6, 0.8]), ["circle", "square", "square"], masks


def test_suppress_duplicates_is_class_agnostic_best_first():
  _, boxes, scores, _, masks = _duplicate_scene()
  np.testing.assert_array_equal(visualize.suppress_duplicates(boxes, scores, masks), [0, 2])
  np.testing.assert_array_equal(visualize.suppress_duplicates(boxes, scores), [0, 2])  # boxes
  # Touching objects are not duplicates: a mask IoU of 0 keeps both even at threshold 0.
  np.testing.assert_array_equal(visualize.suppress_duplicates(boxes[[0, 2]], scores[[0, 2]],
                                                              masks[[0, 2]], 0.0), [0, 1])


def test_one_label_per_object_by_default():
  image, boxes, scores, labels, masks = _duplicate_scene()
  deduped = visualize.draw_instances(image, boxes, scores, labels, masks)
  kept = visualize.draw_instances(image, boxes[[0, 2]], scores[[0, 2]], [labels[0], labels[2]],
                                  masks[[0, 2]], duplicate_iou=None)
  np.testing.assert_array_equal(deduped, kept)
  every = visualize.draw_instances(image, boxes, scores, labels, masks, duplicate_iou=None)
  assert not np.array_equal(every, deduped)  # the duplicate's label and tint are drawn there
