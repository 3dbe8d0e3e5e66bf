"""The whole model with the tiny config: losses, gradients, inference, dtypes and norms."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import backbone_utils
from torchvision.models.detection import mask_rcnn as tv_mrcnn
from torchvision.ops.misc import FrozenBatchNorm2d

from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.kernels import conv as conv_lib
from mrcnn_jax.kernels import winograd
from mrcnn_jax.modeling import heads_v2
from mrcnn_jax.modeling import MaskRCNN
from mrcnn_jax.modeling.mask_rcnn import mask_chunk_bounds
from mrcnn_jax.ops import anchors as anchor_ops


LOSS_KEYS = {"rpn_objectness", "rpn_box", "roi_class", "roi_box", "roi_mask"}
H, W, G, S = 64, 96, 4, 16


def make_batch(seed=0, num_valid=(3, 0)):
  """Two images: the first with ``num_valid[0]`` objects, the second with ``num_valid[1]``."""
  rng = np.random.default_rng(seed)
  b = len(num_valid)
  image = rng.integers(0, 255, (b, H, W, 3)).astype(np.uint8)
  xy = rng.uniform(0, 40, (b, G, 2))
  wh = rng.uniform(12, 40, (b, G, 2))
  boxes = np.minimum(np.concatenate([xy, xy + wh], -1), [W, H, W, H]).astype(np.float32)
  valid = np.arange(G)[None, :] < np.asarray(num_valid)[:, None]
  for i in range(b):  # paint the objects so the image is not pure noise
    for j in np.nonzero(valid[i])[0]:
      x1, y1, x2, y2 = boxes[i, j].astype(int)
      image[i, y1:y2, x1:x2] = 40 * (j + 1)
  return dict(
      image=image,
      gt_boxes=np.where(valid[..., None], boxes, 0).astype(np.float32),
      gt_classes=np.where(valid, rng.integers(1, 3, (b, G)), 0).astype(np.int32),
      gt_masks=(rng.uniform(size=(b, G, S, S)) < 0.6).astype(np.uint8) * valid[..., None, None],
      gt_valid=valid,
      valid_size=np.array([[H, W], [H - 8, W - 16]][:b], np.int32))


@pytest.fixture(scope="module")
def tiny():
  """The tiny model on the CPU kernels (Winograd, matmul gradients, the RoI loop);
  ``test_plain_and_cpu_kernels_agree`` checks the plain layers against it."""
  cfg = modeling.tiny_model_config()
  model = MaskRCNN(cfg, kernels=kernels.CPU)
  variables = jax.jit(lambda k: modeling.init_variables(model, k, (H, W)))(jax.random.key(0))
  return cfg, model, variables


def _loss_and_grads_fn(model):
  """jit(params, batch, key) -> ((total loss, (losses, stats)), gradients)."""
  @jax.jit
  def step(params, batch, key):
    def loss_fn(p):
      losses, stats = model.apply({"params": p}, batch, method=MaskRCNN.losses,
                                  rngs={"sampling": key})
      return sum(losses.values()), (losses, stats)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)
  return step


@pytest.fixture(scope="module")
def loss_and_grads(tiny):
  """The tiny model's jitted losses and gradients, shared by the tests (one compilation)."""
  return _loss_and_grads_fn(tiny[1])


@pytest.fixture(scope="module")
def predict(tiny):
  """One jitted inference function shared by the tests (one compilation)."""
  model = tiny[1]
  return jax.jit(lambda v, x, s: model.apply(v, x, s, method=MaskRCNN.predict))


def _frozen_bn_to_bn(params):
  """Frozen-BN params -> (params, batch_stats) of the same network with trainable BatchNorm
  (the statistics move to their own collection): no second initialisation to compile."""
  params = jax.tree.map(lambda x: x, params)
  stats = {}

  def split(p, s):
    for k, v in list(p.items()):
      if isinstance(v, dict) and "mean" in v and "var" in v:
        s[k] = {"mean": v.pop("mean"), "var": v.pop("var")}
      elif isinstance(v, dict):
        split(v, s.setdefault(k, {}))
        if not s[k]:
          del s[k]

  split(params, stats)
  return params, stats


def _leaves(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_losses_stats_and_gradients(tiny, loss_and_grads):
  cfg, model, variables = tiny
  assert set(variables) == {"params"}
  batch = make_batch()
  (total, (losses, stats)), grads = loss_and_grads(variables["params"], batch, jax.random.key(1))
  assert set(losses) == LOSS_KEYS
  for k, v in losses.items():
    assert v.shape == () and v.dtype == jnp.float32, k
    assert np.isfinite(float(v)) and float(v) > 0, k
  assert {"rpn_num_fg", "roi_num_fg"} <= set(stats)
  assert all(v.shape == () and v.dtype == jnp.float32 for v in stats.values())
  # 3 GT boxes in image 0, none in image 1: the appended GT boxes are foreground RoIs.
  assert float(stats["roi_num_fg"]) >= 1.5 and float(stats["rpn_num_fg"]) >= 1.5
  assert float(stats["roi_num_fg"]) <= cfg.roi.batch_size_per_image * cfg.roi.positive_fraction
  assert np.isclose(float(total), sum(float(v) for v in losses.values()))

  mask = modeling.trainable_mask(variables["params"], cfg)
  assert jax.tree.structure(mask) == jax.tree.structure(variables["params"])
  g, m = _leaves(grads), _leaves(mask)
  frozen = [k for k in g if not m[k]]
  trainable = [k for k in g if m[k]]
  assert any("['layer1']" in k for k in frozen) and any("['conv1']" in k for k in frozen)
  assert all("['backbone']" in k for k in frozen)
  assert not any("['backbone']['layer3']" in k and "kernel" in k for k in frozen)
  for k in frozen:
    assert not np.any(np.asarray(g[k])), f"frozen {k} got gradient"
  for k in trainable:
    assert np.any(np.asarray(g[k])), f"trainable {k} got no gradient"


def test_predict_shapes_and_contract(tiny, predict):
  cfg, model, variables = tiny
  batch = make_batch(seed=1)
  out = predict(variables, batch["image"], batch["valid_size"])
  d = cfg.detections_per_image
  want = dict(boxes=((2, d, 4), jnp.float32), scores=((2, d), jnp.float32),
              classes=((2, d), jnp.int32), masks=((2, d, 28, 28), jnp.float32),
              valid=((2, d), jnp.bool_))
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == want
  valid = np.asarray(out["valid"])
  cls, scores, masks = (np.asarray(out[k]) for k in ("classes", "scores", "masks"))
  assert np.all((cls[valid] >= 1) & (cls[valid] < cfg.num_classes))
  assert np.all(cls[~valid] == 0) and np.all(masks[~valid] == 0)
  assert np.all((masks >= 0) & (masks <= 1))
  assert np.all(scores[valid] > cfg.roi.score_threshold)
  boxes = np.asarray(out["boxes"])
  for i in range(2):
    h, w = batch["valid_size"][i]
    assert np.all(boxes[i, :, 2] <= w) and np.all(boxes[i, :, 3] <= h)
    assert np.all(np.diff(scores[i][valid[i]]) <= 0)  # best first


def test_predict_finds_detections_with_a_confident_classifier(tiny, predict):
  """Random weights give ~uniform class scores (below 0.05 with many classes); biasing the
  classifier to class 1 must produce valid detections whose masks come from the mask head."""
  cfg, model, variables = tiny
  params = jax.tree.map(lambda x: x, variables["params"])
  bias = np.zeros(cfg.num_classes, np.float32)
  bias[1] = 8.0
  params["box_predictor"]["cls_score"]["bias"] = jnp.asarray(bias)
  batch = make_batch(seed=2)
  out = predict({"params": params}, batch["image"], batch["valid_size"])
  valid = np.asarray(out["valid"])
  assert valid.any(axis=1).all()
  assert np.all(np.asarray(out["classes"])[valid] == 1)
  masks = np.asarray(out["masks"])[valid]
  assert masks.std() > 0 and np.all((masks > 0) & (masks < 1))


def test_padding_content_does_not_change_predictions_or_losses(tiny, predict):
  """Pixels outside valid_size are 0 after normalising, as in torchvision's padded batch: what
  the uint8 padding holds (zeros from the pipeline, or anything else) must not matter. Before,
  zero padding became normalised black and changed the detections near the border."""
  cfg, model, variables = tiny
  batch = make_batch(seed=3, num_valid=(3, 2))
  other = dict(batch, image=batch["image"].copy())
  for i, (h, w) in enumerate(batch["valid_size"]):
    other["image"][i, h:] = 255
    other["image"][i, :, w:] = 7
  assert (batch["image"] != other["image"]).any()  # the second image is padded
  a = predict(variables, batch["image"], batch["valid_size"])
  b = predict(variables, other["image"], other["valid_size"])
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  loss = jax.jit(lambda v, bt: model.apply(v, bt, method=MaskRCNN.losses,
                                           rngs={"sampling": jax.random.key(1)})[0])
  la, lb = loss(variables, batch), loss(variables, other)
  for k in la:
    np.testing.assert_array_equal(np.asarray(la[k]), np.asarray(lb[k]), err_msg=k)


def test_bfloat16_losses_are_finite(tiny):
  _, _, variables = tiny  # parameters are float32 whatever the compute dtype
  cfg = modeling.tiny_model_config()
  cfg.compute_dtype = "bfloat16"
  model = MaskRCNN(cfg)
  batch = make_batch(seed=3, num_valid=(2, 1))
  losses, stats = jax.jit(lambda v, b, k: model.apply(v, b, method=MaskRCNN.losses,
                                                      rngs={"sampling": k}))(
                                                          variables, batch, jax.random.key(4))
  for k, v in losses.items():
    assert v.dtype == jnp.float32 and np.isfinite(float(v)) and float(v) > 0, k
  assert float(stats["roi_num_fg"]) >= 1.5


def test_trainable_batchnorm_updates_batch_stats(tiny):
  cfg = modeling.tiny_model_config()
  cfg.norm = "bn"
  model = MaskRCNN(cfg, kernels=kernels.CPU)
  shapes = jax.eval_shape(lambda k: modeling.init_variables(model, k, (H, W)), jax.random.key(0))
  assert set(shapes) == {"params", "batch_stats"}
  params, stats = _frozen_bn_to_bn(tiny[2]["params"])
  variables = {"params": params, "batch_stats": stats}
  assert jax.tree.structure(variables) == jax.tree.structure(shapes)
  batch = make_batch(seed=5, num_valid=(1, 2))
  (losses, _), updates = jax.jit(lambda v, b, k: model.apply(
      v, b, method=MaskRCNN.losses, rngs={"sampling": k}, mutable=["batch_stats"]))(
          variables, batch, jax.random.key(6))
  assert all(np.isfinite(float(v)) for v in losses.values())
  before, after = variables["batch_stats"]["backbone"], updates["batch_stats"]["backbone"]
  # Trainable stages update their statistics; the frozen stem and layer1 keep theirs.
  assert not np.allclose(before["layer2"]["0"]["bn1"]["mean"], after["layer2"]["0"]["bn1"]["mean"])
  np.testing.assert_array_equal(before["layer1"]["0"]["bn1"]["mean"],
                                after["layer1"]["0"]["bn1"]["mean"])
  mask = _leaves(modeling.trainable_mask(variables["params"], cfg))
  assert mask["['backbone']['layer2']['0']['bn1']['scale']"]
  assert not mask["['backbone']['layer1']['0']['bn1']['scale']"]


def _tiny_v2(fpn_norm, box_norm, mask_norm):
  """The tiny config with maskrcnn_resnet50_fpn_v2's head layouts (narrow)."""
  cfg = modeling.tiny_model_config()
  cfg.fpn.norm, cfg.roi.box_head_norm, cfg.mask.norm = fpn_norm, box_norm, mask_norm
  cfg.rpn.head_convs = 2
  cfg.roi.box_head_convs = 2
  cfg.roi.box_head_conv_channels = 16
  return cfg


@pytest.mark.slow  # ~30 s on a loaded 2-core machine (init + one gradient compile)
def test_v2_heads_train_bn_statistics_and_freeze_frozen_norms(monkeypatch):
  """v2 switches select the heads_v2 modules; 'bn' heads update their batch statistics in
  ``losses``, over the valid RoI slots (tests/modeling/test_v2_heads.py checks the masking
  against torchvision), and frozen-BN heads get no gradient (and trainable_mask marks them)."""
  masked, real_mask = [], heads_v2.batch_stats_mask

  def spy(valid, ndim):  # records the mask each trainable-BN layer gets (at trace time)
    masked.append(valid.shape)
    return real_mask(valid, ndim)

  monkeypatch.setattr(heads_v2, "batch_stats_mask", spy)
  cfg = _tiny_v2("bn", "frozen_bn", "bn")
  cfg.norm = "bn"
  model = MaskRCNN(cfg, kernels=kernels.CPU)
  variables = jax.jit(lambda k: modeling.init_variables(model, k, (H, W)))(jax.random.key(0))
  params, stats = variables["params"], variables["batch_stats"]
  assert set(params["rpn_head"]) == {"conv_0", "conv_1", "cls_logits", "bbox_pred"}
  assert set(params["box_head"]) == {"0", "1", "3"}  # 2 convs, Flatten at 2, fc at 3
  assert set(params["box_head"]["0"]["1"]) == {"scale", "bias", "mean", "var"}  # frozen
  assert "mean" in stats["fpn"]["inner_blocks_0_norm"] and "mean" in stats["mask_head"]["1"]["1"]
  assert "bias" not in params["mask_head"]["0"]["0"]  # the norm replaces the conv bias
  batch = make_batch(seed=7)

  @jax.jit
  def step(variables, batch, key):
    def loss_fn(p):
      (losses, _), updates = model.apply(
          {"params": p, "batch_stats": variables["batch_stats"]}, batch, method=MaskRCNN.losses,
          rngs={"sampling": key}, mutable=["batch_stats"])
      return sum(losses.values()), updates
    return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])

  (total, updates), grads = step(variables, batch, jax.random.key(8))
  assert np.isfinite(float(total))
  # Each 'bn' mask-head layer got the mask slots' validity (the box head's norm is frozen).
  slots = batch["image"].shape[0] * cfg.mask.rois_per_image
  assert masked == [(slots,)] * len(cfg.mask.conv_channels)
  after = updates["batch_stats"]
  for path in (("fpn", "layer_blocks_1_norm"), ("mask_head", "1", "1")):
    b, a = stats, after
    for k in path:
      b, a = b[k], a[k]
    assert not np.allclose(b["mean"], a["mean"]), path
  g, m = _leaves(grads), _leaves(modeling.trainable_mask(params, cfg))
  head_frozen = {k for k in g if not m[k] and "['backbone']" not in k}
  assert head_frozen == {f"['box_head']['{i}']['1']['{leaf}']" for i in "01"
                         for leaf in ("scale", "bias", "mean", "var")}
  for k in head_frozen:
    assert not np.any(np.asarray(g[k])), k
  for k in ("['box_head']['1']['0']['kernel']", "['box_head']['3']['kernel']",
            "['rpn_head']['conv_1']['kernel']", "['fpn']['inner_blocks_2_norm']['scale']",
            "['mask_head']['0']['1']['scale']"):
    assert m[k] and np.any(np.asarray(g[k])), k


def test_head_batchnorm_needs_model_batchnorm():
  cfg = _tiny_v2("none", "bn", "none")  # config.norm stays 'frozen_bn': no batch_stats
  with pytest.raises(ValueError, match="roi.box_head_norm.*config.norm"):
    jax.eval_shape(lambda k: modeling.init_variables(MaskRCNN(cfg), k, (H, W)),
                   jax.random.key(0))


@pytest.mark.parametrize("round_to_pixels", [True, False])
def test_anchors_follow_config_round(round_to_pixels):
  cfg = modeling.tiny_model_config()
  cfg.anchors.round = round_to_pixels
  anchors, sizes = MaskRCNN(cfg).apply({}, method=lambda m: m._anchors((H, W)))
  ref = anchor_ops.generate_anchors((H, W), cfg.anchors.strides, cfg.anchors.sizes,
                                    cfg.anchors.aspect_ratios, round_to_pixels=round_to_pixels)
  np.testing.assert_array_equal(np.asarray(anchors), np.concatenate(ref))
  assert sizes == tuple(len(a) for a in ref)
  unrounded = anchor_ops.generate_anchors((H, W), cfg.anchors.strides, cfg.anchors.sizes,
                                          cfg.anchors.aspect_ratios, round_to_pixels=False)
  assert np.array_equal(np.asarray(anchors), np.concatenate(unrounded)) != round_to_pixels


def test_full_model_parameter_counts_match_torchvision():
  """R50-FPN Mask R-CNN (91 classes) with torchvision's pretrained-backbone layout:
  FrozenBatchNorm2d and trainable_layers=3. Same parameter and trainable counts."""
  cfg = modeling.model_config()
  shapes = jax.eval_shape(lambda k: modeling.init_variables(MaskRCNN(cfg), k, (256, 256)),
                          jax.random.key(0))
  params = _leaves(shapes["params"])
  mask = _leaves(modeling.trainable_mask(shapes["params"], cfg))
  size = lambda k: int(np.prod(params[k].shape))

  backbone = backbone_utils._resnet_fpn_extractor(  # pylint: disable=protected-access
      torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
  tv = tv_mrcnn.MaskRCNN(backbone, num_classes=91)
  tv_total = sum(p.numel() for p in tv.parameters())
  tv_trainable = sum(p.numel() for p in tv.parameters() if p.requires_grad)
  tv_frozen_bn = sum(b.numel() for n, b in tv.named_buffers() if "bn" in n or "downsample.1" in n)

  assert sum(size(k) for k in params if mask[k]) == tv_trainable
  # Our FrozenBatchNorm keeps its four arrays in params, torchvision's are buffers.
  assert sum(size(k) for k in params) == tv_total + tv_frozen_bn
  assert tv_trainable < tv_total


def _with_chunk(cfg, chunk):
  cfg = cfg.copy_and_resolve_references()
  cfg.mask.chunk_size = chunk
  return MaskRCNN(cfg, kernels=kernels.CPU)


def test_mask_chunks_without_positives_are_skipped_with_the_same_losses_and_gradients(tiny):
  cfg, _, variables = tiny
  batch = make_batch(seed=3, num_valid=(2, 0))
  key = jax.random.key(7)

  def loss_and_grads(model):
    def f(params):
      losses, stats = model.apply(dict(variables, params=params), batch,
                                  method=MaskRCNN.losses, rngs={"sampling": key})
      return sum(losses.values()), (losses, stats)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])

  (total_c, (losses_c, stats)), grads_c = loss_and_grads(_with_chunk(cfg, 8))
  (total_p, (losses_p, _)), grads_p = loss_and_grads(_with_chunk(cfg, 0))
  # Fewer than 8 positives per image: slots 8-15 of both images form a skipped chunk.
  assert 0 < float(stats["roi_num_fg"]) * 2 < 8, stats
  assert float(losses_p["roi_mask"]) > 0
  for k in losses_p:
    np.testing.assert_allclose(losses_c[k], losses_p[k], rtol=1e-6, err_msg=k)
  mask_grads = jax.tree.leaves(grads_p["mask_head"])
  assert any(float(jnp.abs(g).max()) > 0 for g in mask_grads)
  for gc, gp in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_p)):
    np.testing.assert_allclose(gc, gp, rtol=1e-5, atol=1e-7)


def test_mask_chunks_at_inference_give_the_same_detections(tiny):
  cfg, _, variables = tiny
  batch = make_batch(seed=4, num_valid=(3, 1))

  def run(chunk, threshold):
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.mask.chunk_size = chunk
    cfg2.detections_per_image = 12  # chunks of 8 and 4
    cfg2.roi.score_threshold = threshold
    model = MaskRCNN(cfg2, kernels=kernels.CPU)
    return jax.jit(lambda v, x, s: model.apply(v, x, s, method=MaskRCNN.predict))(
        variables, batch["image"], batch["valid_size"])

  # A threshold that keeps about a quarter of the random model's detections, so the second
  # chunk of 8 holds padding only (the skipped path) in at least one image.
  scores = np.sort(np.asarray(run(0, 0.05)["scores"]).ravel())
  threshold = float(scores[int(0.75 * scores.size)])
  plain = run(0, threshold)
  per_image = np.asarray(plain["valid"]).sum(1)
  assert per_image.sum() > 0 and per_image.min() <= 8, per_image
  # Chunks 8 + 4, and doubling chunks 2 + 2 + 4 + 4 (cut at 12). A chunk's convs see fewer
  # RoIs than the whole, so some take XLA's convolution instead of Winograd (which needs
  # winograd.MIN_TILES tiles): the masks agree to float32 rounding of the two algorithms.
  for chunked in (run(8, threshold), run(2, threshold)):
    for k in plain:
      np.testing.assert_allclose(chunked[k], plain[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_mask_chunk_bounds_double_and_cover_every_slot_once():
  assert mask_chunk_bounds(128, 8) == [(0, 8), (8, 16), (16, 32), (32, 64), (64, 128)]
  assert mask_chunk_bounds(100, 8) == [(0, 8), (8, 16), (16, 32), (32, 64), (64, 100)]
  assert mask_chunk_bounds(5, 8) == [(0, 5)]
  for n, first in [(1, 1), (17, 3), (128, 32), (300, 7)]:
    bounds = mask_chunk_bounds(n, first)
    assert [b[0] for b in bounds[1:]] == [b[1] for b in bounds[:-1]]  # contiguous
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    # Running up to the chunk that holds slot v costs < 2 (v + 1) slots, or the first chunk.
    for v in range(n):
      end = next(stop for start, stop in bounds if start <= v < stop)
      assert end <= max(first, 2 * (v + 1)), (n, first, v, end)
  with pytest.raises(ValueError, match="first chunk"):
    mask_chunk_bounds(8, 0)


def test_prepare_inference_precomputes_kernel_transforms_with_the_same_detections(
    tiny, monkeypatch):
  # Every stride-1 3x3 conv of the tiny model takes Winograd (the full model's are larger).
  monkeypatch.setattr(winograd, "MIN_TILES", 1)
  _, model, variables = tiny
  batch = make_batch(seed=5, num_valid=(3, 1))
  prepared = kernels.prepare_inference(model, variables, (H, W), batch_size=2)
  assert set(prepared) == set(variables) | {conv_lib.TRANSFORMED_KERNELS}
  stored = flax.traverse_util.flatten_dict(prepared[conv_lib.TRANSFORMED_KERNELS], sep="/")
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  # The mask head's 14x14 maps use F(5x5); the RPN conv, shared by the levels, stores one.
  assert {"mask_head/mask_fcn1/kernel_f5", "mask_head/mask_fcn2/kernel_f5",
          "rpn_head/conv/kernel_f4", "fpn/layer_blocks_0/kernel_f4"} <= set(stored), stored
  for path, u in stored.items():
    layer, name = path.rsplit("/", 1)
    np.testing.assert_allclose(
        u, winograd.kernel_transform(params[layer + "/kernel"], int(name[-1])), rtol=1e-6,
        err_msg=path)

  run = jax.jit(lambda v, x, s: model.apply(v, x, s, method=MaskRCNN.predict))
  plain = run(variables, batch["image"], batch["valid_size"])
  fast = run(prepared, batch["image"], batch["valid_size"])
  assert int(plain["valid"].sum()) > 0
  for k in plain:
    np.testing.assert_allclose(fast[k], plain[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # predict reads the stored transforms (in every mask chunk): changing one changes the masks.
  broken = flax.traverse_util.unflatten_dict(
      {k: (0 * u if k == "mask_head/mask_fcn1/kernel_f5" else u) for k, u in stored.items()},
      sep="/")
  masks = run({**prepared, conv_lib.TRANSFORMED_KERNELS: broken}, batch["image"],
              batch["valid_size"])["masks"]
  assert float(jnp.abs(masks - plain["masks"]).max()) > 1e-3
  # Training refuses them: the stored transforms would not follow parameter updates.
  with pytest.raises(ValueError, match="prepare_inference"):
    model.apply(prepared, batch, method=MaskRCNN.losses, rngs={"sampling": jax.random.key(0)})


def test_prepare_inference_without_winograd_layers_returns_the_plain_variables(tiny):
  # bfloat16 convolutions never take Winograd, nor ShardedConv's, nor the plain layers.
  cfg, model, variables = tiny
  bf16 = cfg.copy_and_resolve_references()
  bf16.compute_dtype = "bfloat16"
  prepared = kernels.prepare_inference(MaskRCNN(bf16, kernels=kernels.CPU), variables, (H, W))
  assert set(prepared) == set(variables)
  for kernel_set in (kernels.CPU_SHARDED, kernels.PLAIN):
    assert set(kernels.prepare_inference(MaskRCNN(cfg, kernels=kernel_set), variables,
                                         (H, W))) == set(variables)
  # ...while the float32 model's mask head (10 detections x 9 tiles) does.
  assert set(kernels.prepare_inference(model, variables, (H, W))) == set(variables) | {
      conv_lib.TRANSFORMED_KERNELS}


def test_init_variables_same_tree_and_shapes_under_plain_and_cpu_kernels():
  cfg = modeling.tiny_model_config()
  init = lambda ks: jax.eval_shape(
      lambda k: modeling.init_variables(MaskRCNN(cfg, kernels=ks), k, (H, W)), jax.random.key(0))
  shapes = [init(ks) for ks in (kernels.PLAIN, kernels.CPU, kernels.CPU_SHARDED)]
  flat = [{k: (v.shape, v.dtype) for k, v in flax.traverse_util.flatten_dict(s, sep="/").items()}
          for s in shapes]
  assert flat[0] == flat[1] == flat[2]
  assert "params/mask_predictor/conv5_mask/kernel" in flat[0]


def test_plain_and_cpu_kernels_agree(tiny, loss_and_grads, predict):
  """The plain layers (what TPUs and GPUs run) against the CPU kernels, same variables: losses,
  gradients and detections agree to float32 rounding of the two algorithms. The CPU side runs
  the module's shared jitted functions (compiled once for the other tests too)."""
  cfg, _, variables = tiny
  plain_model = MaskRCNN(cfg)
  batch = make_batch(seed=6, num_valid=(3, 2))
  args = (variables["params"], batch, jax.random.key(3))

  (_, (losses_p, _)), grads_p = _loss_and_grads_fn(plain_model)(*args)
  (_, (losses_c, _)), grads_c = loss_and_grads(*args)
  for k in losses_p:
    np.testing.assert_allclose(losses_c[k], losses_p[k], rtol=1e-4, atol=1e-6, err_msg=k)
  flat_p = flax.traverse_util.flatten_dict(grads_p, sep="/")
  flat_c = flax.traverse_util.flatten_dict(grads_c, sep="/")
  assert flat_p.keys() == flat_c.keys()
  for k in flat_p:
    scale = float(jnp.abs(flat_p[k]).max()) + 1e-6
    np.testing.assert_allclose(flat_c[k] / scale, flat_p[k] / scale, atol=2e-3, err_msg=k)
  plain_predict = jax.jit(lambda v, x, s: plain_model.apply(v, x, s, method=MaskRCNN.predict))
  out_p = plain_predict(variables, batch["image"], batch["valid_size"])
  out_c = predict(variables, batch["image"], batch["valid_size"])
  assert int(out_p["valid"].sum()) > 0
  np.testing.assert_array_equal(out_c["valid"], out_p["valid"])
  np.testing.assert_allclose(out_c["scores"], out_p["scores"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out_c["boxes"], out_p["boxes"], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(out_c["masks"], out_p["masks"], atol=1e-4)
