"""The keypoint branch in the whole model: switches, parameter trees, and one training step
against torchvision's ``KeypointRCNN`` (deterministic sampling: every candidate taken, see
``train_parity_case``), on one device and on a 2-device mesh."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from mrcnn_jax import convert
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.modeling import MaskRCNN
from mrcnn_jax.modeling.config import upgrade_model_config
from mrcnn_jax.run import checkpoint as checkpoint_lib
from mrcnn_jax.run import sharding as sharding_lib
from tests.convert import torch_models as tm
from tests.modeling import train_parity_case as case

K = 4  # keypoints per instance
LOSS_NAMES = {"loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_box",
              "loss_classifier": "roi_class", "loss_box_reg": "roi_box",
              "loss_keypoint": "roi_keypoint"}
KEYPOINT_SLOTS = 128
_SHIFT = "keypoint_predictor/kps_score_lowres/bias"


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _init(config):
  model = MaskRCNN(config, kernels=kernels.CPU)  # its init key compiles fast; same tree
  return jax.jit(lambda k: modeling.init_variables(model, k, (64, 64)))(jax.random.key(0))


def _keypoint_config(mask: bool):
  config = modeling.tiny_model_config()
  config.mask.enabled = mask
  config.keypoint.enabled = True
  config.keypoint.num_keypoints = K
  config.keypoint.conv_channels = (16, 16)
  return config


@pytest.fixture(scope="module")
def today():
  """The tiny default config's variables (keypoints off), flat."""
  return _flat(_init(modeling.tiny_model_config()))


def test_keypoints_off_leaves_the_parameter_tree_as_before_the_switches(today):
  """The default config (keypoints off) initialises exactly the variables of a config without
  the new fields (``mask.enabled``, the ``keypoint`` section), i.e. of the model before them."""
  old = modeling.tiny_model_config()
  del old.mask["enabled"]
  del old["keypoint"]
  before = _flat(_init(old))
  assert today.keys() == before.keys()
  for path, value in before.items():
    np.testing.assert_array_equal(today[path], value, err_msg=path)
  assert not any(p.startswith("params/keypoint") for p in today)


def test_configs_saved_before_the_switches_load_as_mask_rcnn():
  """A model config saved before ``mask.enabled`` and ``keypoint`` existed upgrades to today's
  defaults (Mask R-CNN), so its checkpoints restore and evaluate under today's config; a
  keypoint-only inference setting may differ, the switches may not."""
  saved = json.loads(modeling.model_config().to_json_best_effort())
  del saved["mask"]["enabled"], saved["keypoint"]
  upgraded = upgrade_model_config(saved)
  assert upgraded.to_dict() == modeling.model_config().to_dict()
  assert upgraded.mask.enabled is True and upgraded.keypoint.enabled is False
  config = ml_collections.ConfigDict({"model": modeling.model_config()})
  meta = {"model_config": saved}
  checkpoint_lib.check_model_config(config, meta, "old")
  config.model.keypoint.max_resize = 256
  checkpoint_lib.check_model_config(config, meta, "old",
                                    ignore=checkpoint_lib.INFERENCE_FREE_FIELDS)
  config.model.keypoint.enabled = True
  with pytest.raises(ValueError, match="model.keypoint.enabled"):
    checkpoint_lib.check_model_config(config, meta, "old",
                                      ignore=checkpoint_lib.INFERENCE_FREE_FIELDS)


def test_masks_off_keypoints_on_swaps_the_branch_modules_and_needs_gt_keypoints(today):
  """No mask parameters, the keypoint modules added, every other value as in the default
  model; the losses have ``roi_keypoint`` and no ``roi_mask``, from ``gt_keypoints``."""
  config = _keypoint_config(mask=False)
  ours = _flat(_init(config))
  modules = lambda flat: sorted({p.split("/")[1] for p in flat})  # noqa: E731
  assert modules(today) == ["backbone", "box_head", "box_predictor", "fpn", "mask_head",
                            "mask_predictor", "rpn_head"]
  assert modules(ours) == ["backbone", "box_head", "box_predictor", "fpn", "keypoint_head",
                           "keypoint_predictor", "rpn_head"]
  assert sorted(p for p in ours if "keypoint" in p) == [
      "params/keypoint_head/0/bias", "params/keypoint_head/0/kernel",
      "params/keypoint_head/2/bias", "params/keypoint_head/2/kernel",
      "params/keypoint_predictor/kps_score_lowres/bias",
      "params/keypoint_predictor/kps_score_lowres/kernel"]
  assert ours["params/keypoint_predictor/kps_score_lowres/kernel"].shape == (4, 4, 16, K)
  for path, value in ours.items():
    if "keypoint" not in path:
      np.testing.assert_array_equal(value, today[path], err_msg=path)

  losses, predict = _shapes(config)
  batch = dict(image=jnp.zeros((1, 64, 64, 3), jnp.uint8),
               gt_boxes=jnp.zeros((1, 2, 4)), gt_classes=jnp.zeros((1, 2), jnp.int32),
               gt_valid=jnp.zeros((1, 2), bool))
  with pytest.raises(ValueError, match="gt_keypoints"):
    losses(batch)
  with pytest.raises(ValueError, match=r"gt_keypoints \[B, G, 4, 3\]"):
    losses(dict(batch, gt_keypoints=jnp.zeros((1, 2, 17, 3))))
  got = losses(dict(batch, gt_keypoints=jnp.zeros((1, 2, K, 3))))
  assert set(got) == {"rpn_objectness", "rpn_box", "roi_class", "roi_box", "roi_keypoint"}
  out = predict()
  assert set(out) == {"boxes", "scores", "classes", "valid", "keypoints", "keypoint_scores"}
  d = config.detections_per_image
  assert out["keypoints"].shape == (1, d, K, 2) and out["keypoint_scores"].shape == (1, d, K)

  # Both branches: one step trains masks and keypoints, predict gives both.
  losses, predict = _shapes(_keypoint_config(mask=True))
  got = losses(dict(batch, gt_keypoints=jnp.zeros((1, 2, K, 3)),
                    gt_masks=jnp.zeros((1, 2, 16, 16), jnp.uint8)))
  assert {"roi_mask", "roi_keypoint"} <= set(got)
  assert {"masks", "keypoints", "keypoint_scores"} <= set(predict())


def _shapes(config):
  """``(losses(batch), predict())`` of ``config``'s model, as shapes (traced, not run)."""
  model = MaskRCNN(config)
  variables = jax.eval_shape(lambda k: modeling.init_variables(model, k, (64, 64)),
                             jax.random.key(0))
  losses = lambda b: jax.eval_shape(lambda v: model.apply(  # noqa: E731
      v, b, method=MaskRCNN.losses, rngs={"sampling": jax.random.key(0)}), variables)[0]
  predict = lambda: jax.eval_shape(lambda v: model.apply(  # noqa: E731
      v, jnp.zeros((1, 64, 64, 3), jnp.uint8), method=MaskRCNN.predict), variables)
  return losses, predict


# ---------------------------------------------------------------------------- training step


def _with_keypoints(batch, targets, seed: int = 0):
  """``case.scene``'s batch and targets plus K keypoints per GT box: points around each box
  (some outside it, so invalid), visibility 0, 1 or 2, one point exactly on the box's right
  edge (torchvision's boundary rule: the last heatmap column)."""
  rng = np.random.default_rng(seed)
  b, g = batch["gt_valid"].shape
  keypoints = np.zeros((b, g, K, 3), np.float32)
  for i, t in enumerate(targets):
    kps = []
    for j, (x1, y1, x2, y2) in enumerate(t["boxes"].numpy()):
      xy = rng.uniform([x1 - 4, y1 - 4], [x2 + 4, y2 + 4], size=(K, 2))
      xy[0, 0] = x2
      kp = np.concatenate([xy, rng.integers(0, 3, (K, 1))], -1).astype(np.float32)
      keypoints[i, j] = kp
      kps.append(kp)
    targets[i] = dict(t, keypoints=torch.from_numpy(np.stack(kps)))
  return dict(batch, gt_keypoints=keypoints), targets


def _torch_model():
  images, _ = case.torch_images(case.scene(1000)[0])
  model = tm.small_keypointrcnn(
      seed=0, num_classes=case.CLASSES, num_keypoints=K, fpn=32, rep=64,
      keypoint_channels=(32, 32), calibration=images,
      rpn_pre_nms_top_n_train=case.PRE_NMS, rpn_post_nms_top_n_train=case.ALL_PROPOSALS,
      rpn_batch_size_per_image=case.ALL_ANCHORS, rpn_positive_fraction=1.0,
      box_batch_size_per_image=case.ALL_ROIS, box_positive_fraction=1.0)
  return tm.randomize_biases(model, 0).train()


def _torch_step(model, batch, targets):
  """torchvision's losses (our names) and ``{state-dict key: gradient}`` (float64)."""
  x, sizes = case.torch_images(batch)
  model.zero_grad(set_to_none=True)
  images = ImageList(x, sizes)
  feats = model.backbone(images.tensors)
  proposals, rpn_losses = model.rpn(images, feats, targets)
  _, roi_losses = model.roi_heads(feats, proposals, images.image_sizes, targets)
  losses = {**rpn_losses, **roi_losses}
  sum(losses.values()).backward()
  grads = {k: p.grad.numpy().astype(np.float64) for k, p in model.named_parameters()
           if p.grad is not None}
  return {LOSS_NAMES[k]: float(v.detach()) for k, v in losses.items()}, grads


def _converted(model):
  """Our variables and config at the sampler settings :func:`_torch_model` gives torchvision."""
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  variables, config = convert.convert_torchvision_keypointrcnn(state)
  config.rpn.pre_nms_top_k_train = case.PRE_NMS
  config.rpn.post_nms_top_k_train = case.ALL_PROPOSALS
  config.rpn.batch_size_per_image = case.ALL_ANCHORS
  config.roi.batch_size_per_image = case.ALL_ROIS
  config.rpn.positive_fraction = config.roi.positive_fraction = 1.0
  config.keypoint.rois_per_image = KEYPOINT_SLOTS
  return variables, config


def _keypoint_gradients(model, grads):
  """torchvision's gradients of the keypoint layers as our tree (the converter is linear)."""
  state = {k: np.zeros_like(v.numpy(), np.float64) for k, v in model.state_dict().items()}
  state.update({k: g for k, g in grads.items() if k in state})
  params = convert.convert_torchvision_keypointrcnn(state)[0]["params"]
  return _flat({k: params[k] for k in ("keypoint_head", "keypoint_predictor")})


@pytest.fixture(scope="module")
def step():
  batch, targets = _with_keypoints(*case.scene(0))
  model = _torch_model()
  variables, config = _converted(model)
  losses, grads = _torch_step(model, batch, targets)
  return dict(batch=batch, variables=variables, config=config, losses=losses,
              grads=_keypoint_gradients(model, grads))


def _check(step, losses, grads, stats, where):
  b = step["batch"]["image"].shape[0]
  assert 0 < stats["roi_num_fg"] * b < KEYPOINT_SLOTS, stats  # every positive has a slot
  assert set(losses) == set(step["losses"]), where
  for name, ref in step["losses"].items():
    assert abs(losses[name] - ref) <= 1e-4 * abs(ref), (where, name, losses[name], ref)
  ours = _flat({k: grads[k] for k in ("keypoint_head", "keypoint_predictor")})
  worst = 0.0
  for path, ref in step["grads"].items():
    if path == _SHIFT:
      continue
    err = tm.rel_err(ours[path], ref)
    assert err < 1e-4, (where, path, err)
    worst = max(worst, err)
  # The predictor's bias adds a constant to a whole heatmap, which its softmax ignores: the
  # true gradient is 0, and both sides hold float32 rounding of a sum of zero.
  scale = np.abs(step["grads"][_SHIFT.replace("bias", "kernel")]).max()
  for g in (ours[_SHIFT], step["grads"][_SHIFT]):
    assert np.abs(g).max() < 1e-4 * scale, (where, g, scale)
  return worst


def test_training_step_equals_torchvision_keypointrcnn(step):
  """roi_keypoint is torchvision's loss_keypoint (and the other four losses its own) on the
  same batch; the keypoint layers' gradients equal torchvision's."""
  losses, grads, stats, _ = case.our_step(step["variables"], step["config"], step["batch"])
  worst = _check(step, losses, grads, stats, "1 device")
  print(f"roi_keypoint {losses['roi_keypoint']:.6f} vs torchvision "
        f"{step['losses']['roi_keypoint']:.6f}; worst keypoint gradient error {worst:.1e}")


def test_training_step_on_a_mesh_equals_torchvision(step):
  mesh = sharding_lib.make_mesh(jax.devices()[:2])
  batch = sharding_lib.make_global_batch(step["batch"], mesh)
  variables = jax.device_put(step["variables"], sharding_lib.replicated(mesh))
  losses, grads, stats, _ = case.our_step(variables, step["config"], batch, mesh=mesh)
  _check(step, losses, grads, stats, "2 devices")
