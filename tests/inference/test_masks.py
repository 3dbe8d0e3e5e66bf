"""Host-side mask pasting: bit for bit torchvision's ``paste_masks_in_image`` (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mrcnn_jax.inference import masks as masks_lib


def _torchvision(masks, boxes, im_h, im_w):
  """[N, im_h, im_w] float32 of torchvision's paste (boxes must overlap the image)."""
  return paste_masks_in_image(torch.from_numpy(np.asarray(masks, np.float32))[:, None],
                              torch.from_numpy(np.asarray(boxes, np.float32)), (im_h, im_w),
                              padding=1)[:, 0].numpy()


def _assert_bitwise(masks, boxes, im_h, im_w):
  expected = _torchvision(masks, boxes, im_h, im_w)
  for i, (m, b) in enumerate(zip(masks, boxes)):
    got = masks_lib.paste_mask(m, b, (im_h, im_w))
    assert got.dtype == np.float32
    assert np.array_equal(got, expected[i]), (
        f"case {i}, box {b.tolist()}: {np.sum(got != expected[i])} pixels differ, max "
        f"{np.abs(got - expected[i]).max()}")
    assert np.array_equal(got > 0.5, expected[i] > 0.5)


def test_saturated_mask_issue_case():
  """A mask of 1.0 with zero left columns: border pixels land near 0.5 (float64 gave 1430 px)."""
  mask = np.ones((28, 28), np.float32)
  mask[:, :3] = 0.0
  box = np.array([8.7445, 73.7168, 60.7880, 127.4674], np.float32)
  expected = _torchvision(mask[None], box[None], 200, 200)[0]
  got = masks_lib.paste_mask(mask, box, (200, 200))
  assert np.array_equal(got, expected)
  assert int((got > 0.5).sum()) == int((expected > 0.5).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_mask_matches_torchvision(seed):
  rng = np.random.default_rng(seed)
  im_h, im_w = 57, 83
  n = 12
  masks = rng.uniform(size=(n, 28, 28)).astype(np.float32)
  xy0 = rng.uniform(-20, 70, size=(n, 2))
  wh = rng.uniform(0.2, 60, size=(n, 2))
  wh[0] = (0.0, 0.0)  # degenerate box
  wh[1] = (150.0, 120.0)  # larger than the image
  boxes = np.concatenate([xy0, xy0 + wh], axis=1).astype(np.float32)
  # torchvision pastes boxes already clipped to the image (its own slicing breaks otherwise).
  boxes = np.clip(boxes, 0, np.array([im_w, im_h, im_w, im_h], np.float32))
  _assert_bitwise(masks, boxes, im_h, im_w)


def test_saturated_masks_random_boxes():
  """Masks of exact 0s and 1s: every border pixel is a sum of weights, the 0.5 crossings exact."""
  rng = np.random.default_rng(7)
  n, im = 400, 200
  masks = np.ones((n, 28, 28), np.float32)
  for i in range(n):
    side, k = rng.integers(4), rng.integers(0, 6)
    np.rot90(masks[i], side)[:, :k] = 0.0
  xy0 = rng.uniform(0, 150, size=(n, 2))
  wh = rng.uniform(1.0, 120, size=(n, 2))
  boxes = np.clip(np.concatenate([xy0, xy0 + wh], axis=1), 0, im).astype(np.float32)
  _assert_bitwise(masks, boxes, im, im)


def test_tiny_boxes():
  """Boxes under 2 px: the resize output is 1-4 px, or as large as the padded mask (a copy)."""
  rng = np.random.default_rng(3)
  n = 64
  masks = rng.uniform(size=(n, 28, 28)).astype(np.float32)
  xy0 = rng.uniform(0, 40, size=(n, 2))
  wh = rng.uniform(0, 2, size=(n, 2))
  wh[:8] = 0.0
  boxes = np.concatenate([xy0, xy0 + wh], axis=1).astype(np.float32)
  # Expanded sizes equal to the padded mask (30 px): torch copies instead of interpolating.
  boxes[-4:] = np.array([[10.0, 10.0, 38.0, 38.0], [0.0, 0.0, 28.0, 27.5],
                         [5.0, 1.0, 33.0, 1.5], [1.0, 2.0, 1.5, 30.0]], np.float32)
  _assert_bitwise(masks, boxes, 48, 48)


def test_boxes_at_and_over_the_image_edges():
  rng = np.random.default_rng(11)
  im_h, im_w = 64, 90
  boxes = np.array([
      [0.0, 0.0, 20.0, 30.0],  # at the top-left corner: the grown box starts at -1
      [70.0, 40.0, 90.0, 64.0],  # at the bottom-right corner
      [-15.0, -8.0, 25.0, 20.0],  # over the top-left
      [60.0, 50.0, 120.0, 95.0],  # over the bottom-right
      [-30.0, 10.0, 130.0, 50.0],  # wider than the image
      [20.0, -40.0, 40.0, 100.0],  # taller than the image
      [-0.4, -0.3, 5.0, 5.0],  # grown corner truncated to 0 from below
      [89.0, 63.0, 90.0, 64.0],  # tiny, in the last pixel
      [-200.0, -150.0, 300.0, 250.0],  # far larger than the image (separable loop)
  ], np.float32)
  masks = rng.uniform(size=(len(boxes), 28, 28)).astype(np.float32)
  _assert_bitwise(masks, boxes, im_h, im_w)


def test_thousands_of_random_cases():
  """2,400 random masks and boxes, both of torch's loops (out_h + out_w up to and over 128)."""
  rng = np.random.default_rng(2024)
  n, im_h, im_w = 2400, 160, 200
  masks = rng.uniform(size=(n, 28, 28)).astype(np.float32)
  # A third saturated (values 0 or 1), a third near 0.5, a third uniform.
  masks[: n // 3] = (masks[: n // 3] > 0.3).astype(np.float32)
  masks[n // 3: 2 * n // 3] = 0.5 + (masks[n // 3: 2 * n // 3] - 0.5) * 1e-3
  size = np.exp(rng.uniform(np.log(0.5), np.log(180), size=(n, 2)))
  xy0 = rng.uniform(-30, np.array([im_w, im_h]) - 1, size=(n, 2))
  boxes = np.concatenate([xy0, xy0 + size], axis=1)
  # Every box overlaps the image (torchvision's slicing needs it); many cross its edges.
  boxes[:, 2:] = np.maximum(boxes[:, 2:], 0.0)
  boxes = boxes.astype(np.float32)
  grown = (boxes[:, 2:] - boxes[:, :2]) * 30 / 28 + 1
  assert np.any(grown.sum(1) <= 120) and np.any(grown.sum(1) >= 140)
  _assert_bitwise(masks, boxes, im_h, im_w)


def test_outside_the_image_is_empty():
  """Boxes beyond the image (torchvision's slicing fails there) paste nothing."""
  mask = np.ones((28, 28), np.float32)
  for box in ([-50, -50, -10, -10], [300, 10, 320, 30], [10, 100, 30, 120]):
    out = masks_lib.paste_mask(mask, np.array(box, np.float32), (64, 90))
    assert out.shape == (64, 90) and not out.any()


def _grid_sample(masks, boxes, im_h, im_w):
  """Detectron2's paste with torch's grid_sample (align_corners=False) at the float boxes."""
  b = torch.from_numpy(np.asarray(boxes, np.float32))
  gx = (torch.arange(im_w) + 0.5 - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1
  gy = (torch.arange(im_h) + 0.5 - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1
  grid = torch.stack([gx[:, None, :].expand(-1, im_h, -1), gy[:, :, None].expand(-1, -1, im_w)],
                     -1)
  return torch.nn.functional.grid_sample(torch.from_numpy(np.asarray(masks, np.float32))[:, None],
                                         grid, align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_paste_mask_aligned_matches_grid_sample_and_the_op(seed):
  import jax  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.ops import masks as ops_masks  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  n, m, im_h, im_w = 40, 28, 61, 83
  masks = rng.random((n, m, m)).astype(np.float32)
  xy = rng.uniform(-20, 80, (n, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0.3, 70, (n, 2))], 1).astype(np.float32)
  expected = _grid_sample(masks, boxes, im_h, im_w)
  op = np.asarray(jax.jit(ops_masks.paste_masks, static_argnums=2, static_argnames="aligned")(
      masks, boxes, (im_h, im_w), aligned=True))
  for i in range(n):
    got = masks_lib.paste_mask(masks[i], boxes[i], (im_h, im_w), aligned=True)
    assert got.dtype == np.float32 and got.shape == (im_h, im_w)
    np.testing.assert_allclose(got, expected[i], atol=1e-5, rtol=0, err_msg=f"case {i}")
    np.testing.assert_allclose(got, op[i], atol=1e-5, rtol=0, err_msg=f"case {i}")
  assert np.count_nonzero(expected) > 0.05 * expected.size
  # An empty box or a box off the image pastes nothing.
  for box in ([5, 5, 5, 20], [-30, 4, -10, 20], [3, 70, 20, 90]):
    assert not masks_lib.paste_mask(masks[0], np.array(box, np.float32), (im_h, im_w),
                                    aligned=True).any()
