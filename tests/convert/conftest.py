"""Shared oracle models for the conversion tests (built once per session: R50 is not free)."""

from __future__ import annotations

import pytest
import torch

from mrcnn_jax import convert
from tests.convert import torch_models as tm


@pytest.fixture(scope="session")
def v1_model():
  """Random ``maskrcnn_resnet50_fpn`` (v1), random BN statistics and biases, sharpened class
  logits (x20) so softmax scores clear the detection threshold."""
  model = tm.maskrcnn_v1(seed=0)
  with torch.no_grad():
    model.roi_heads.box_predictor.cls_score.weight.mul_(20.0)
  return model


@pytest.fixture(scope="session")
def v1_converted(v1_model):
  return convert.convert_torchvision_maskrcnn(v1_model.state_dict())
