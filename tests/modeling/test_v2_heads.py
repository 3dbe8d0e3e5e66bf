"""maskrcnn_resnet50_fpn_v2's FPN and heads (modeling.heads_v2, FPN(norm=...)) against
torchvision's own modules, with weights converted by ``convert_torchvision_maskrcnn_v2`` from a
random v2 model (random BatchNorm statistics and biases, so a wrong mapping shows)."""

from __future__ import annotations

import copy
import functools

import flax
import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection import mask_rcnn

from mrcnn_jax import convert
from mrcnn_jax.modeling import fpn as fpn_lib
from mrcnn_jax.modeling import heads_v2
from tests.convert import torch_models as tm

_TOL = 1e-4


@pytest.fixture(scope="module")
def v2():
  torch.manual_seed(0)
  model = mask_rcnn.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                             num_classes=5)
  model = tm.randomize_biases(tm.randomize_norms(model, 0), 0).eval()
  variables, config = convert.convert_torchvision_maskrcnn_v2(model.state_dict())
  return model, variables, config


def _sub(variables, name):
  return {k: v[name] for k, v in variables.items() if name in v}


def test_v2_config_read_from_the_state(v2):
  _, variables, config = v2
  assert config.rpn.head_convs == 2 and config.roi.box_head_convs == 4
  assert config.roi.representation_size == 1024 and config.num_classes == 5
  assert config.fpn.norm == config.roi.box_head_norm == config.mask.norm == "frozen_bn"
  assert "bias" not in variables["params"]["fpn"]["inner_blocks_0"]  # the norm replaces it
  assert variables["params"]["box_head"]["5"]["kernel"].shape == (7 * 7 * 256, 1024)


def test_fpn_with_norm_matches_torchvision(v2):
  model, variables, config = v2
  x = np.random.default_rng(0).normal(size=(1, 64, 96, 3)).astype(np.float32)
  with torch.no_grad():
    body = model.backbone.body(tm.nchw(x))
    ref = list(model.backbone.fpn(body).values())
  feats = [tm.nhwc(f) for f in body.values()]
  ours = jax.jit(lambda v, f: fpn_lib.FPN(256, norm=config.fpn.norm).apply(v, f))(
      _sub(variables, "fpn"), feats)
  assert len(ours) == 5
  for i, (o, r) in enumerate(zip(ours, ref)):
    assert tm.rel_err(o, tm.nhwc(r)) < _TOL, f"P{i + 2}"


@pytest.mark.parametrize("seed", [0, 1])
def test_two_conv_rpn_head_matches_torchvision(v2, seed):
  model, variables, config = v2
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(2, s, s + 2, 256)).astype(np.float32) for s in (8, 4, 2)]
  with torch.no_grad():
    logits, deltas = model.rpn.head([tm.nchw(f) for f in feats])
  ref_logits = np.concatenate([tm.nhwc(l).reshape(2, -1) for l in logits], axis=1)
  ref_deltas = np.concatenate(
      [tm.nhwc(d).reshape(2, d.shape[2], d.shape[3], -1, 4).reshape(2, -1, 4) for d in deltas], 1)
  head = heads_v2.RPNHeadV2(3, config.rpn.head_convs)
  ours_logits, ours_deltas = jax.jit(head.apply)(_sub(variables, "rpn_head"), feats)
  assert tm.rel_err(ours_logits, ref_logits) < _TOL
  assert tm.rel_err(ours_deltas, ref_deltas) < _TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_fc_box_head_matches_torchvision(v2, seed):
  model, variables, config = v2
  x = np.random.default_rng(seed).normal(size=(2, 3, 7, 7, 256)).astype(np.float32)
  with torch.no_grad():
    ref = model.roi_heads.box_head(tm.nchw(x.reshape(6, 7, 7, 256))).numpy().reshape(2, 3, -1)
  head = heads_v2.FastRCNNConvFCHead((256,) * 4, (1024,), config.roi.box_head_norm)
  ours = jax.jit(head.apply)(_sub(variables, "box_head"), x)
  assert tm.rel_err(ours, ref) < _TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_head_with_norm_matches_torchvision(v2, seed):
  model, variables, config = v2
  x = np.random.default_rng(seed).normal(size=(3, 14, 14, 256)).astype(np.float32)
  with torch.no_grad():
    ref = model.roi_heads.mask_head(tm.nchw(x))
  head = heads_v2.MaskRCNNHeadsNorm((256,) * 4, config.mask.norm)
  ours = jax.jit(head.apply)(_sub(variables, "mask_head"), x)
  assert tm.rel_err(ours, tm.nhwc(ref)) < _TOL


def test_trainable_bn_heads_keep_statistics_in_batch_stats(v2):
  model, _, _ = v2
  config = convert.torchvision_maskrcnn_v2_config(model.state_dict(), head_norm="bn")
  config.norm = "bn"
  variables, _ = convert.convert_torchvision_maskrcnn_v2(model.state_dict(), config=config)
  stats = flax.traverse_util.flatten_dict(variables["batch_stats"], sep="/")
  np.testing.assert_array_equal(stats["mask_head/2/1/var"],
                                model.roi_heads.mask_head[2][1].running_var.numpy())
  np.testing.assert_array_equal(stats["fpn/layer_blocks_3_norm/mean"],
                                model.backbone.fpn.layer_blocks[3][1].running_mean.numpy())
  assert "mean" not in variables["params"]["box_head"]["0"]["1"]
  x = np.random.default_rng(0).normal(size=(2, 14, 14, 256)).astype(np.float32)
  head = heads_v2.MaskRCNNHeadsNorm((256,) * 4, "bn")
  with torch.no_grad():
    ref = model.roi_heads.mask_head(tm.nchw(x))  # eval mode: running statistics
  ours = head.apply(_sub(variables, "mask_head"), x, train=False)
  assert tm.rel_err(ours, tm.nhwc(ref)) < _TOL


def _bn_variables(model):
  config = convert.torchvision_maskrcnn_v2_config(model.state_dict(), head_norm="bn")
  config.norm = "bn"
  return convert.convert_torchvision_maskrcnn_v2(model.state_dict(), config=config)[0]


def _with_padding(rng, real, valid, shape):
  """``real`` rows placed at the ``valid`` slots, far-off values (padding RoIs) elsewhere."""
  x = (50.0 + 10.0 * rng.normal(size=(len(valid),) + shape)).astype(np.float32)
  x[valid] = real
  return x


def test_trainable_bn_mask_head_normalises_over_valid_slots_only(v2):
  """Training-mode BatchNorm against torchvision's in train mode, which sees the real RoIs
  only: our static batch also carries padding slots, which ``valid`` keeps out of the batch
  statistics (and without it, they would shift every slot's output)."""
  model, _, _ = v2
  variables = _sub(_bn_variables(model), "mask_head")
  rng = np.random.default_rng(1)
  real = rng.normal(size=(3, 14, 14, 256)).astype(np.float32)
  valid = np.array([True, True, False, True, False])
  x = _with_padding(rng, real, valid, (14, 14, 256))
  with torch.no_grad():
    ref = tm.nhwc(copy.deepcopy(model.roi_heads.mask_head).train()(tm.nchw(real)))
  head = heads_v2.MaskRCNNHeadsNorm((256,) * 4, "bn")
  apply = jax.jit(functools.partial(head.apply, train=True, mutable=["batch_stats"]))
  ours, _ = apply(variables, x, valid=valid)
  assert tm.rel_err(np.asarray(ours)[valid], ref) < _TOL
  unmasked, _ = apply(variables, x)
  assert tm.rel_err(np.asarray(unmasked)[valid], ref) > 0.1  # the premise
  # No valid slot: the statistics of every slot, finite (not a mean over nothing).
  nothing, stats = apply(variables, x, valid=np.zeros(5, bool))
  assert tm.rel_err(nothing, unmasked) < _TOL
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(stats))


def test_trainable_bn_box_head_normalises_over_valid_slots_only(v2):
  model, _, _ = v2
  variables = _sub(_bn_variables(model), "box_head")
  rng = np.random.default_rng(2)
  real = rng.normal(size=(4, 7, 7, 256)).astype(np.float32)
  valid = np.array([True, False, True, True, False, True])
  x = _with_padding(rng, real, valid, (7, 7, 256)).reshape(2, 3, 7, 7, 256)
  with torch.no_grad():
    ref = copy.deepcopy(model.roi_heads.box_head).train()(tm.nchw(real)).numpy()
  head = heads_v2.FastRCNNConvFCHead((256,) * 4, (1024,), "bn")
  ours, _ = jax.jit(functools.partial(head.apply, train=True, mutable=["batch_stats"]))(
      variables, x, valid=valid.reshape(2, 3))
  assert tm.rel_err(np.asarray(ours).reshape(6, -1)[valid], ref) < _TOL


def test_frozen_norm_paths_and_bad_norm():
  config = convert.torchvision_maskrcnn_v2_config()
  assert heads_v2.is_frozen_norm_path(["mask_head", "0", "1", "scale"], config)
  assert heads_v2.is_frozen_norm_path(["fpn", "inner_blocks_2_norm", "mean"], config)
  assert not heads_v2.is_frozen_norm_path(["box_head", "5", "kernel"], config)
  assert not heads_v2.is_frozen_norm_path(["box_head", "0", "0", "kernel"], config)
  with pytest.raises(ValueError, match="head norm"):
    heads_v2.MaskRCNNHeadsNorm((8,), "batch").init(jax.random.key(0), np.zeros((1, 4, 4, 8)))
