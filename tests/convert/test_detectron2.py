"""Detectron2 ``.pkl`` import, on a checkpoint written locally in Detectron2's layout from a
random torchvision v1 model (no Detectron2 install): the converted variables must equal the
torchvision conversion's, and the class/colour layout conversions must be the right ones."""

from __future__ import annotations

import pickle

import flax
import jax
import numpy as np
import pytest
import torch

from mrcnn_jax import convert
from mrcnn_jax.convert import detectron2 as d2
from mrcnn_jax.modeling import resnet as resnet_lib
from mrcnn_jax.ops import anchors as anchor_ops
from tests.convert import torch_models as tm


def _to_detectron2(tv: dict, agnostic: bool = False) -> dict:
  """A torchvision v1 state dict (numpy) renamed and re-laid-out as Detectron2 stores it."""
  out = {}
  for k, v in tv.items():
    if k.endswith("num_batches_tracked"):
      continue
    if k.startswith("backbone.body."):
      k = k[len("backbone.body."):]
      if k.startswith(("conv1.", "bn1.")):
        k = "stem.conv1." + ("weight" if k == "conv1.weight" else "norm." + k.split(".", 1)[1])
        if k == "stem.conv1.weight":
          v = v[:, ::-1]  # Detectron2's MSRA models read BGR
      else:
        layer, block, name, rest = k.split(".", 3)
        stage = f"res{int(layer[-1]) + 1}.{block}"
        if name == "downsample":
          idx, leaf = rest.split(".")
          k = f"{stage}.shortcut." + (leaf if idx == "0" else "norm." + leaf)
        elif name.startswith("bn"):
          k = f"{stage}.conv{name[-1]}.norm.{rest}"
        else:
          k = f"{stage}.{name}.{rest}"
      k = "backbone.bottom_up." + k
    elif k.startswith("backbone.fpn."):
      _, _, kind, idx, _, leaf = k.split(".")
      k = f"backbone.fpn_{'lateral' if kind == 'inner_blocks' else 'output'}{int(idx) + 2}.{leaf}"
    elif k.startswith("rpn.head."):
      k = (k.replace("rpn.head.conv.0.0", "proposal_generator.rpn_head.conv")
           .replace("rpn.head.cls_logits", "proposal_generator.rpn_head.objectness_logits")
           .replace("rpn.head.bbox_pred", "proposal_generator.rpn_head.anchor_deltas"))
    elif k.startswith("roi_heads.box_head."):
      k = k.replace("fc6", "fc1").replace("fc7", "fc2")
    elif k.startswith("roi_heads.box_predictor.cls_score"):
      v = np.concatenate([v[1:], v[:1]])  # background last
    elif k.startswith("roi_heads.box_predictor.bbox_pred"):
      v = v[4:8] if agnostic else v[4:]  # no background slot
    elif k.startswith("roi_heads.mask_head."):
      i, _, leaf = k.split(".")[2:]
      k = f"roi_heads.mask_head.mask_fcn{int(i) + 1}.{leaf}"
    elif k.startswith("roi_heads.mask_predictor."):
      k = (k.replace("mask_predictor.conv5_mask", "mask_head.deconv")
           .replace("mask_predictor.mask_fcn_logits", "mask_head.predictor"))
      if "predictor" in k:
        v = v[1:]
    out[k] = np.ascontiguousarray(v)
  return out


@pytest.fixture(scope="module")
def tv_state(v1_model):
  return {k: v.numpy() for k, v in v1_model.state_dict().items()}


@pytest.fixture(scope="module")
def d2_state(tv_state):
  s = _to_detectron2(tv_state)
  # The checkpoint's own pixel statistics (BGR), here torchvision's, so the two models compute
  # the same function: the converter must put them back in RGB order.
  s["pixel_mean"] = np.array([0.406, 0.456, 0.485], np.float32).reshape(3, 1, 1) * 255
  s["pixel_std"] = np.array([0.225, 0.224, 0.229], np.float32).reshape(3, 1, 1) * 255
  return s


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def test_pkl_round_trip_equals_torchvision_conversion(tmp_path, d2_state, v1_converted):
  path = tmp_path / "model_final.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": d2_state, "__author__": "test"}, f)
  variables, config = convert.convert_detectron2(convert.load_detectron2_pkl(str(path)),
                                                 stride_in_1x1=False)
  tv_vars, tv_config = v1_converted
  ours, ref = _flat(variables), _flat(tv_vars)
  assert set(ours) == set(ref)
  for k in ref:
    a, b = ours[k], ref[k]
    if k.startswith("params/box_predictor/bbox_pred/kernel"):
      a, b = a[:, 4:], b[:, 4:]  # background deltas: zeros vs unused torchvision values
      np.testing.assert_array_equal(ours[k][:, :4], 0)
    elif k.startswith("params/box_predictor/bbox_pred/bias"):
      a, b = a[4:], b[4:]
    elif k.startswith("params/mask_predictor/mask_fcn_logits"):
      a, b = a[..., 1:], b[..., 1:]
    np.testing.assert_array_equal(a, b, err_msg=k)
  np.testing.assert_allclose(config.pixel_mean, tv_config.pixel_mean, rtol=1e-6)
  np.testing.assert_allclose(config.pixel_std, tv_config.pixel_std, rtol=1e-6)
  assert config.roi.aligned is True and tv_config.roi.aligned is False
  assert config.mask.aligned is True and tv_config.mask.aligned is False
  assert config.num_classes == 91 and config.backbone.depth == 50


def test_default_msra_statistics_and_bgr_flip(d2_state):
  state = {k: v for k, v in d2_state.items() if not k.startswith("pixel_")}
  variables, config = convert.convert_detectron2(state, stride_in_1x1=False)
  np.testing.assert_allclose(config.pixel_mean, (123.675, 116.28, 103.53))
  np.testing.assert_allclose(config.pixel_std, (1.0, 1.0, 1.0))
  kernel = np.asarray(variables["params"]["backbone"]["conv1"]["kernel"])  # HWIO, I = RGB
  bgr = state["backbone.bottom_up.stem.conv1.weight"]  # OIHW, I = BGR
  np.testing.assert_array_equal(kernel[:, :, 0, :], bgr[:, 2].transpose(1, 2, 0))
  _, rgb_config = convert.convert_detectron2(state, stride_in_1x1=False, input_format="RGB")
  np.testing.assert_allclose(rgb_config.pixel_mean, (103.53, 116.28, 123.675))


def test_class_agnostic_box_regression_is_shared(tv_state):
  state = _to_detectron2(tv_state, agnostic=True)
  variables, _ = convert.convert_detectron2(state, stride_in_1x1=False)
  k = np.asarray(variables["params"]["box_predictor"]["bbox_pred"]["kernel"]).reshape(-1, 91, 4)
  np.testing.assert_array_equal(k[:, 0], 0)
  for c in (1, 17, 90):
    np.testing.assert_array_equal(k[:, c], state["roi_heads.box_predictor.bbox_pred.weight"].T)


def test_class_logits_background_moves_first(tv_state, d2_state):
  variables, _ = convert.convert_detectron2(d2_state, stride_in_1x1=False)
  w = d2_state["roi_heads.box_predictor.cls_score.weight"]
  x = np.random.default_rng(0).normal(size=(5, w.shape[1])).astype(np.float32)
  d2_logits = x @ w.T + d2_state["roi_heads.box_predictor.cls_score.bias"]
  p = variables["params"]["box_predictor"]["cls_score"]
  ours = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(ours[:, 0], d2_logits[:, -1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[:, 1:], d2_logits[:, :-1], rtol=1e-5, atol=1e-5)


def test_missing_norm_statistics_default_to_identity(d2_state):
  state = {k: v for k, v in d2_state.items() if not k.endswith(("running_mean", "running_var"))}
  variables, _ = convert.convert_detectron2(state, stride_in_1x1=False)
  bn = variables["params"]["backbone"]["layer2"]["0"]["bn1"]
  np.testing.assert_array_equal(bn["mean"], 0)
  np.testing.assert_array_equal(bn["var"], 1)


def test_errors_are_named(d2_state, tmp_path):
  bad = dict(d2_state)
  bad["roi_heads.box_head.fc3.weight"] = np.zeros((2, 2), np.float32)
  del bad["backbone.fpn_output4.bias"]
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_detectron2(bad, stride_in_1x1=False)
  assert "roi_heads.box_head.fc3.weight" in str(e.value)
  assert "backbone.fpn_output4.bias" in str(e.value)
  path = tmp_path / "c2.pkl"
  with open(path, "wb") as f:
    pickle.dump({"blobs": {"res2_0_branch2a_w": np.zeros(1)}}, f)
  with pytest.raises(NotImplementedError, match="Caffe2"):
    convert.load_detectron2_pkl(str(path))


def test_detectron2_config_defaults():
  c = d2.detectron2_config()
  assert c.roi.aligned and c.rpn.min_size == 0 and c.roi.min_size == 0
  assert c.rpn.post_nms_top_k_test == 1000 and c.roi.score_threshold == 0.05


def test_msra_defaults_set_stride_in_1x1_and_unrounded_anchors(d2_state):
  variables, config = convert.convert_detectron2(d2_state)  # STRIDE_IN_1X1=True by default
  assert config.backbone.stride_in_1x1 is True and config.anchors.round is False
  plain, plain_config = convert.convert_detectron2(d2_state, stride_in_1x1=False)
  assert plain_config.backbone.stride_in_1x1 is False
  for k, v in _flat(plain).items():  # same weights: only where the stride sits differs
    np.testing.assert_array_equal(_flat(variables)[k], v, err_msg=k)
  given = d2.detectron2_config(d2_state)
  given.backbone.stride_in_1x1 = False
  _, config = convert.convert_detectron2(d2_state, config=given)
  assert config.backbone.stride_in_1x1 is True


@pytest.mark.parametrize("seed", [0, 1])
def test_stride_in_1x1_resnet_matches_torch(seed):
  """Oracle: torchvision's Bottleneck with each strided block's stride moved from conv2 to
  conv1, which is Detectron2's STRIDE_IN_1X1 bottleneck (the MSRA ResNet)."""
  torch.manual_seed(seed)
  body = tm.randomize_norms(tm.narrow_resnet_body(width=8, blocks=(1, 2, 1, 1)), seed)
  for name in ("layer2", "layer3", "layer4"):
    block = getattr(body, name)[0]
    block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
  variables, config = convert.convert_torchvision_resnet(body.state_dict())
  config.backbone.stride_in_1x1 = True
  x = np.random.default_rng(seed).normal(size=(2, 64, 96, 3)).astype(np.float32)
  with torch.no_grad():
    y = body.maxpool(body.relu(body.bn1(body.conv1(tm.nchw(x)))))
    ref = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
      y = getattr(body, name)(y)
      ref.append(tm.nhwc(y))
  params = {"params": variables["params"]["backbone"]}
  ours = jax.jit(lambda v, x: resnet_lib.ResNet(config).apply(v, x))(params, x)
  for i, (o, r) in enumerate(zip(ours, ref)):
    assert tm.rel_err(o, r) < 1e-4, f"C{i + 2}"
  config.backbone.stride_in_1x1 = False  # the switch matters: torchvision's layout differs
  plain = jax.jit(lambda v, x: resnet_lib.ResNet(config).apply(v, x))(params, x)
  assert tm.rel_err(plain[1], ref[1]) > 1e-2


def _detectron2_cell_anchors(sizes, ratios):
  """Detectron2's DefaultAnchorGenerator.generate_cell_anchors, in plain Python floats."""
  out = []
  for size in sizes:
    for ratio in ratios:
      w = (size * size / ratio) ** 0.5
      h = ratio * w
      out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(out, np.float32)


@pytest.mark.parametrize("size,ratios", [(32, (0.5, 1.0, 2.0)), (90.5, (0.25, 1.0, 3.0))])
def test_unrounded_anchors_are_detectron2s(size, ratios):
  ours = anchor_ops.generate_anchors((128, 192), (16,), ((size,),), ratios,
                                     round_to_pixels=False)[0]
  cell = _detectron2_cell_anchors((size,), ratios)
  # Detectron2: grid offsets (x, y) * stride, offset 0, row-major, then the cell anchors.
  ys, xs = np.meshgrid(np.arange(0, 128, 16), np.arange(0, 192, 16), indexing="ij")
  shifts = np.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).astype(np.float32)
  np.testing.assert_allclose(ours, (shifts + cell[None]).reshape(-1, 4), rtol=0, atol=1e-5)
  assert not np.array_equal(ours, np.round(ours))  # fractional, unlike torchvision's
  rounded = anchor_ops.generate_anchors((128, 192), (16,), ((size,),), ratios)[0]
  np.testing.assert_array_equal(rounded, np.round(rounded))
