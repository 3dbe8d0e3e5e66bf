"""ResNet and ResNet-FPN parity with torchvision, random weights and BN statistics."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models import _utils as tv_utils

from mrcnn_jax import convert
from mrcnn_jax.modeling import resnet as resnet_lib
from tests.convert import torch_models as tm

_TOL = 1e-4


def _ours_features(variables, config, x):
  from mrcnn_jax import modeling
  model = modeling.MaskRCNN(config)
  fn = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.fpn(m.backbone(x))))
  return fn(variables, x)


def test_resnet50_imagenet_stages_match_torchvision():
  torch.manual_seed(1)
  net = tm.randomize_norms(torchvision.models.resnet50(weights=None), 1).eval()
  variables, config = convert.convert_torchvision_resnet(net.state_dict())
  assert config.backbone.depth == 50 and config.backbone.stage_blocks is None
  assert set(variables) == {"params"} and set(variables["params"]) == {"backbone"}
  x = np.random.default_rng(1).normal(size=(2, 64, 96, 3)).astype(np.float32)
  getter = tv_utils.IntermediateLayerGetter(
      net, {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"})
  with torch.no_grad():
    ref = list(getter(tm.nchw(x)).values())
  ours = jax.jit(lambda v, x: resnet_lib.ResNet(config).apply(v, x))(
      {"params": variables["params"]["backbone"]}, x)
  for i, (o, r) in enumerate(zip(ours, ref)):
    assert tm.rel_err(o, tm.nhwc(r)) < _TOL, f"C{i + 2}"


def test_resnet101_depth_inferred_and_fc_dropped(caplog):
  net = torchvision.models.resnet101(weights=None)
  with caplog.at_level("INFO"):
    variables, config = convert.convert_torchvision_resnet(net.state_dict())
  assert config.backbone.depth == 101
  assert "ImageNet classifier" in caplog.text
  assert len(variables["params"]["backbone"]["layer3"]) == 23


def test_resnet_unknown_and_missing_keys_are_named():
  sd = torchvision.models.resnet50(weights=None).state_dict()
  sd = collections.OrderedDict(sd)
  sd["layer2.0.extra.weight"] = torch.zeros(3)
  del sd["layer3.1.bn2.running_var"]
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_torchvision_resnet(sd)
  assert "layer2.0.extra.weight" in str(e.value)
  assert "layer3.1.bn2.running_var" in str(e.value)


def test_resnet_shape_mismatch_is_named():
  sd = collections.OrderedDict(torchvision.models.resnet50(weights=None).state_dict())
  sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
  with pytest.raises(convert.ConversionError, match=r"layer1/0/conv2/kernel"):
    convert.convert_torchvision_resnet(sd)


def test_resnet50_fpn_matches_torchvision():
  seed = 2
  model = tm.maskrcnn_v1(seed)
  variables, config = convert.convert_torchvision_maskrcnn(model.state_dict())
  x = np.random.default_rng(seed).normal(size=(1, 64, 96, 3)).astype(np.float32)
  with torch.no_grad():
    ref = list(model.backbone(tm.nchw(x)).values())
  ours = _ours_features(variables, config, x)
  assert len(ours) == len(ref) == 5
  for i, (o, r) in enumerate(zip(ours, ref)):
    assert tm.rel_err(o, tm.nhwc(r)) < _TOL, f"P{i + 2}"


def test_bn_mode_puts_statistics_in_batch_stats():
  model = tm.maskrcnn_v1(0)
  config = convert.torchvision_maskrcnn_config(model.state_dict())
  config.norm = "bn"
  variables, _ = convert.convert_torchvision_maskrcnn(model.state_dict(), config=config)
  assert "mean" in variables["batch_stats"]["backbone"]["bn1"]
  assert "mean" not in variables["params"]["backbone"]["bn1"]
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["layer1"]["0"]["bn2"]["var"],
                                model.backbone.body.layer1[0].bn2.running_var.numpy())
