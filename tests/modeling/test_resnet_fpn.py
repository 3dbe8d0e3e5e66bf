"""ResNet and FPN: layout and numerics against torchvision, norms, freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: F401
from torchvision.ops import feature_pyramid_network as tv_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from mrcnn_jax.modeling import resnet as resnet_lib
from mrcnn_jax.modeling.config import model_config, tiny_model_config
from mrcnn_jax.modeling.fpn import FPN, upsample_nearest
from mrcnn_jax.modeling.resnet import ResNet
from tests.modeling.torch_weights import randomize_frozen_bn, torch_to_flax

# Threefry draws compile for seconds each on a busy CPU; initialisation draws once per
# parameter array, so the tests initialise with RngBitGenerator keys (as init_variables does).
KEY = jax.random.key(0, impl="unsafe_rbg")


def _count(tree, keep=lambda path: True):
  return sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(tree)
             if keep(jax.tree_util.keystr(p)))


@pytest.mark.parametrize("depth", [50, 101])
def test_parameter_count_matches_torchvision(depth):
  cfg = model_config()
  cfg.backbone.depth = depth
  shapes = jax.eval_shape(ResNet(cfg).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert set(shapes) == {"params"}  # frozen BN: one collection, nothing mutable
  tv = getattr(torchvision.models, f"resnet{depth}")()
  tv_params = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
  tv_stats = sum(b.numel() for n, b in tv.named_buffers() if "running" in n)
  is_stat = lambda k: k.endswith("['mean']") or k.endswith("['var']")
  assert _count(shapes["params"], lambda k: not is_stat(k)) == tv_params
  assert _count(shapes["params"], is_stat) == tv_stats
  if depth == 50:
    assert tv_params == 23_508_032


@pytest.mark.parametrize("size", [(45, 61), (64, 64)])
def test_resnet_matches_torchvision_with_converted_weights(size):
  """A one-block-per-stage torchvision ResNet (FrozenBatchNorm2d, random statistics) and ours
  with its weights renamed by the layout rules agree stage by stage, odd sizes included."""
  gen = torch.Generator().manual_seed(0)
  tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                        norm_layer=FrozenBatchNorm2d)
  randomize_frozen_bn(tv, gen)
  tv.eval()
  x = torch.randn(2, 3, *size, generator=gen)
  with torch.no_grad():
    y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    want = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
      y = layer(y)
      want.append(y.numpy().transpose(0, 2, 3, 1))
  sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
  params = torch_to_flax(sd)
  cfg = model_config()
  cfg.backbone.stage_blocks = (1, 1, 1, 1)
  got = jax.jit(lambda p, x: ResNet(cfg).apply({"params": p}, x))(
      params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-4 * np.abs(w).max())


def test_fpn_matches_torchvision():
  """torchvision FeaturePyramidNetwork + LastLevelMaxPool, on maps whose sizes are not exact
  multiples of two (the nearest-neighbour rule and P6's ceil)."""
  gen = torch.Generator().manual_seed(1)
  in_ch = [8, 16, 24, 32]
  sizes = [(25, 17), (13, 9), (7, 5), (4, 3)]
  tv = tv_fpn.FeaturePyramidNetwork(in_ch, 12, extra_blocks=tv_fpn.LastLevelMaxPool())
  for p in tv.parameters():  # non-zero biases so their placement is checked too
    torch.nn.init.normal_(p, generator=gen)
  feats = [torch.randn(2, c, h, w, generator=gen) for c, (h, w) in zip(in_ch, sizes)]
  with torch.no_grad():
    want = list(tv({str(i): f for i, f in enumerate(feats)}).values())

  def rename(module):  # inner_blocks.0.0 -> inner_blocks_0
    return [f"{module[0]}_{module[1]}"]

  params = torch_to_flax(tv.state_dict(), rename)
  got = jax.jit(lambda p, f: FPN(12).apply({"params": p}, f))(
      params, [jnp.asarray(f.numpy().transpose(0, 2, 3, 1)) for f in feats])
  assert len(got) == 5
  for g, w in zip(got, want):
    w = w.numpy().transpose(0, 2, 3, 1)
    assert g.shape == w.shape
    # Scaled to the output's magnitude (N(0, 1) weights make it ~40): on CPU the 3x3 convs
    # run as Winograd, whose float32 rounding is ~1e-5 of that.
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=3e-5 * np.abs(w).max())


@pytest.mark.parametrize("in_hw,out_hw", [((3, 4), (6, 8)), ((4, 3), (7, 5)), ((2, 2), (5, 3))])
def test_upsample_nearest_matches_torch(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(1, 2, *in_hw)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.tensor(x), size=out_hw, mode="nearest")
  got = upsample_nearest(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw)
  np.testing.assert_array_equal(np.asarray(got), want.numpy().transpose(0, 2, 3, 1))


# frozen_bn with the default trainable_layers=3 is covered on the whole model in
# test_mask_rcnn.py; here GroupNorm with everything trainable (the stem's norm included).
@pytest.mark.parametrize("norm,trainable_layers", [("gn", 5)])
def test_gradients_reach_exactly_the_trainable_backbone_params(norm, trainable_layers):
  cfg = tiny_model_config()
  cfg.norm = norm
  cfg.backbone.trainable_layers = trainable_layers
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  params = jax.jit(ResNet(cfg).init)(KEY, x)["params"]
  grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(f * f) for f in ResNet(cfg).apply(
      {"params": p}, x))))(params)
  n_trainable = 0
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    keys = [str(k.key) for k in path]
    trainable = resnet_lib.backbone_trainable(keys, cfg)
    n_trainable += trainable
    if trainable:
      assert np.abs(np.asarray(g)).max() > 0, keys
    else:
      assert np.all(np.asarray(g) == 0), keys
  assert n_trainable == len(jax.tree.leaves(params))


@pytest.mark.parametrize("n,frozen", [
    (0, ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
    (3, ("conv1", "bn1", "layer1")),
    (4, ("conv1", "bn1")),
    (5, ()),
])
def test_frozen_modules_follow_torchvision_trainable_layers(n, frozen):
  cfg = model_config()
  cfg.backbone.trainable_layers = n
  assert resnet_lib.frozen_modules(cfg) == frozen
  assert not resnet_lib.backbone_trainable(["layer2", "0", "bn1", "scale"], cfg)  # frozen BN
  assert resnet_lib.backbone_trainable(["layer4", "0", "conv2", "kernel"], cfg) == (n > 0)
  assert not resnet_lib.backbone_trainable(["layer4", "0", "downsample", "1", "var"], cfg)
  assert resnet_lib.backbone_trainable(["layer4", "0", "downsample", "0", "kernel"], cfg) == (
      n > 0)


def test_bad_settings_raise():
  cfg = model_config()
  cfg.backbone.trainable_layers = 6
  with pytest.raises(ValueError, match="trainable_layers"):
    resnet_lib.frozen_modules(cfg)
  cfg = model_config()
  cfg.backbone.depth = 34
  with pytest.raises(ValueError, match="depth"):
    resnet_lib.stage_blocks(cfg)
  cfg = model_config()
  cfg.norm = "ln"
  with pytest.raises(ValueError, match="norm"):
    jax.eval_shape(ResNet(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_bfloat16_activations_float32_params():
  cfg = tiny_model_config()
  cfg.compute_dtype = "bfloat16"
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.bfloat16)

  @jax.jit
  def run(x):
    variables = ResNet(cfg).init(KEY, x)
    feats, fpn_vars = FPN(32, jnp.bfloat16).init_with_output(
        jax.random.fold_in(KEY, 1), ResNet(cfg).apply(variables, x))
    return variables, fpn_vars, feats

  variables, fpn_vars, feats = run(x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves((variables, fpn_vars)))
  for f, s in zip(feats, (4, 8, 16, 32, 64)):
    assert f.dtype == jnp.bfloat16 and f.shape == (1, 64 // s, 64 // s, 32)
    assert np.isfinite(np.asarray(f, np.float32)).all()
