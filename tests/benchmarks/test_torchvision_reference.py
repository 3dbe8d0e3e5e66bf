"""benchmarks.torchvision_reference: the like-for-like torchvision inference time runs the same
network as its whole call."""

from __future__ import annotations

import torch
from torchvision.models.detection import transform as tv_transform

from mrcnn_jax.benchmarks import torchvision_reference


def test_torchvision_detect_is_the_whole_call_before_its_postprocess():
  """The like-for-like torchvision inference time runs the model's eval forward without its
  postprocess: the same boxes, scores and labels, and 28x28 masks that paste into the whole
  call's image-sized ones."""
  torch.manual_seed(0)
  model = torchvision_reference.torchvision_model(160, 192).eval()
  images = [torch.rand(3, 160, 192, generator=torch.Generator().manual_seed(1))]
  with torch.inference_mode():
    whole = model(images)[0]
    detected = torchvision_reference.torchvision_detect(model, images)[0]
  assert detected["boxes"].shape[0] > 0
  assert detected["masks"].shape[1:] == (1, 28, 28)
  for key in ("boxes", "scores", "labels"):
    torch.testing.assert_close(detected[key], whole[key], rtol=0, atol=0)
  assert whole["masks"].shape[2:] == (160, 192)
  torch.testing.assert_close(
      tv_transform.paste_masks_in_image(detected["masks"], detected["boxes"], (160, 192)),
      whole["masks"], rtol=0, atol=0)
