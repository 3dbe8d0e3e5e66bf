"""Host-side mask pasting against torchvision's ``paste_masks_in_image``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mrcnn_jax.inference import masks as masks_lib


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
  expected = paste_masks_in_image(
      torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (im_h, im_w), padding=1
  )[:, 0].numpy()
  got = np.stack([masks_lib.paste_mask(m, b, (im_h, im_w)) for m, b in zip(masks, boxes)])
  np.testing.assert_allclose(got, expected, atol=1e-5)
