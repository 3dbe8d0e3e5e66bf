"""One training step of torchvision's Mask R-CNN and of ours on the same weights and batch.

The pieces shared by ``test_train_parity.py``:

* :func:`scene`: a batch of noisy images with coloured shapes, one of them smaller than the
  padded size, given to torchvision as its targets (full-image masks) and to us as the batch
  contract (masks cropped to their box). Every GT box is an ``S x S`` square with integer
  corners, at least 2 px inside its image, so the cropped mask *is* the full-image mask
  there and our mask targets are torchvision's exactly (``ops/masks.py``).
* :func:`torch_model`: a narrow torchvision ``MaskRCNN`` of the v1 layout (FrozenBN body,
  plain FPN and heads) or the v2 one (BatchNorm body, FPN and heads in train mode, 2-conv RPN
  head, 4conv1fc box head), with non-trivial random weights.
* :func:`torch_step`: torchvision's training forward (``GeneralizedRCNN.forward`` after its
  transform: we hand it the normalised, zero-padded batch ourselves, so nothing is resized)
  and backward: the losses and each parameter's gradient.
* :func:`our_step`: ours: the converted variables, ``MaskRCNN.losses`` and its gradient under
  ``jax.jit`` (optionally on a mesh).
* :func:`converted_gradients`: torchvision's gradients mapped onto our parameter tree with the
  weight converter itself (renames and transposes are linear, so gradients map like weights).

Deterministic sampling: with every sampler asked for more slots than there are candidates and
a positive fraction of 1, both samplers take every labelled anchor / proposal, and the proposal
counts are set above the anchors per level, so the random draws only permute the samples
(which no loss depends on).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchvision.models.detection import backbone_utils
from torchvision.models.detection import faster_rcnn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.image_list import ImageList

from mrcnn_jax import convert
from mrcnn_jax import modeling
from mrcnn_jax.convert import torchvision as tv_convert
from tests.convert import torch_models as tm

H, W = 96, 160  # the padded batch: a multiple of 32 (torchvision's padding), not of 64
SIZES = ((96, 160), (80, 128))  # the second image is zero-padded to (H, W)
S = 32  # GT box side = the cropped masks' resolution
CLASSES = 4  # background and three shapes
MAX_INSTANCES = 4
# Sampler sizes above every candidate count: 96 x 160 has 3843 anchors (2880 on P2, so every
# anchor enters NMS), NMS at 0.7 leaves about 1000 proposals per image (well under 2000) and
# the GT boxes join them; 128 mask slots hold the ~20 positive RoIs per image.
ALL_ANCHORS = 4096
PRE_NMS = 4096
ALL_PROPOSALS = 2000
ALL_ROIS = ALL_PROPOSALS + MAX_INSTANCES
MASK_SLOTS = 128
# The longest RoI side is 160 px: ceil(160 / 28) = 6 samples per mask-target bin, as torchvision.
MASK_TARGET_SAMPLES = 6
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
LOSS_NAMES = {"loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_box",
              "loss_classifier": "roi_class", "loss_box_reg": "roi_box", "loss_mask": "roi_mask"}


def _shape(rng, kind: int) -> np.ndarray:
  """[S, S] bool: an ellipse, a triangle or a rectangle inside the box, 2 px from its edges."""
  yy, xx = np.mgrid[:S, :S] + 0.5
  c = (S - 4) / 2
  if kind == 1:
    a, b = rng.uniform(0.6, 1.0, size=2) * c
    return ((xx - S / 2) / a) ** 2 + ((yy - S / 2) / b) ** 2 <= 1
  if kind == 2:
    t = (yy - 2) / (S - 4)
    return (yy >= 2) & (yy < S - 2) & (np.abs(xx - S / 2) <= t * c)
  x0, y0 = rng.integers(2, 8, size=2)
  return (xx > x0) & (xx < S - x0) & (yy > y0) & (yy < S - y0)


def scene(seed: int, sizes: Sequence[Tuple[int, int]] = SIZES):
  """A batch of ``len(sizes)`` images, each with 1-3 shapes in ``S x S`` boxes.

  Returns:
    (batch, targets): our batch dict (uint8 images zero-padded to (H, W), ``valid_size``,
    ``gt_*`` padded to ``MAX_INSTANCES``, masks cropped to the boxes) and torchvision's list
    of target dicts (float boxes, int64 labels, uint8 full-image masks of each image's size).
  """
  rng = np.random.default_rng(seed)
  b = len(sizes)
  batch = dict(image=np.zeros((b, H, W, 3), np.uint8), valid_size=np.array(sizes, np.int32),
               gt_boxes=np.zeros((b, MAX_INSTANCES, 4), np.float32),
               gt_classes=np.zeros((b, MAX_INSTANCES), np.int32),
               gt_masks=np.zeros((b, MAX_INSTANCES, S, S), np.uint8),
               gt_valid=np.zeros((b, MAX_INSTANCES), bool))
  targets = []
  for i, (h, w) in enumerate(sizes):
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(0, 90, size=3)
    img += rng.normal(0, 6, size=img.shape)
    boxes, labels, masks = [], [], []
    for g in range(int(rng.integers(1, 4))):
      kind = int(rng.integers(1, CLASSES))
      x0, y0 = int(rng.integers(2, w - S - 2)), int(rng.integers(2, h - S - 2))
      crop = _shape(rng, kind)
      full = np.zeros((h, w), bool)
      full[y0:y0 + S, x0:x0 + S] = crop
      img[full] = rng.uniform(120, 255, size=3)
      boxes.append([x0, y0, x0 + S, y0 + S])
      labels.append(kind)
      masks.append(full)
      batch["gt_boxes"][i, g] = boxes[-1]
      batch["gt_classes"][i, g] = kind
      batch["gt_masks"][i, g] = crop
      batch["gt_valid"][i, g] = True
    batch["image"][i, :h, :w] = np.clip(img, 0, 255).astype(np.uint8)
    targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32),
                        labels=torch.tensor(labels, dtype=torch.int64),
                        masks=torch.from_numpy(np.stack(masks).astype(np.uint8))))
  return batch, targets


def torch_images(batch, dtype=torch.float32) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
  """torchvision's ``ImageList`` contents: the normalised images, zero-padded, and sizes."""
  x = (batch["image"].astype(np.float32) / 255.0 - MEAN) / STD
  for i, (h, w) in enumerate(batch["valid_size"]):
    x[i, h:], x[i, :, w:] = 0.0, 0.0
  return tm.nchw(x).to(dtype), [tuple(int(v) for v in s) for s in batch["valid_size"]]


def torch_model(version: str, seed: int = 0, *, deterministic: bool = True,
                width: int = 16, fpn: int = 32, rep: int = 64, mask_ch: int = 32) -> torch.nn.Module:
  """A narrow torchvision Mask R-CNN in train mode, layers 2-4 of the body trainable.

  ``version`` 'v1': FrozenBatchNorm2d body (calibrated on a scene so its features are
  unit-scale), plain FPN, TwoMLPHead, 2 mask convs. 'v2': BatchNorm2d body and FPN, 2-conv
  RPN head, a 4-conv + fc box head and mask convs with BatchNorm (``maskrcnn_resnet50_fpn_v2``'s
  classes), every BatchNorm training on batch statistics. ``deterministic``: samplers take
  every candidate (see the module docstring); else torchvision's default sampler sizes.
  """
  torch.manual_seed(seed)
  images, _ = torch_images(scene(1000 + seed)[0])
  bn = version == "v2"
  body = tm.narrow_resnet_body(width, calibration=None if bn else images)
  if bn:  # narrow_resnet_body freezes its norms; v2 trains them
    body = _unfrozen(body)
  for name, p in body.named_parameters():
    p.requires_grad_(name.split(".")[0] in ("layer2", "layer3", "layer4"))
  chans = [width * 4 * 2**i for i in range(4)]
  norm = torch.nn.BatchNorm2d if bn else None
  backbone = backbone_utils.BackboneWithFPN(
      body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, chans, fpn,
      norm_layer=norm)
  kwargs = dict(rpn_pre_nms_top_n_train=PRE_NMS, rpn_post_nms_top_n_train=ALL_PROPOSALS)
  if deterministic:
    kwargs.update(rpn_batch_size_per_image=ALL_ANCHORS, rpn_positive_fraction=1.0,
                  box_batch_size_per_image=ALL_ROIS, box_positive_fraction=1.0)
  if bn:
    kwargs.update(
        rpn_head=tv_rpn.RPNHead(fpn, 3, conv_depth=2),
        box_head=faster_rcnn.FastRCNNConvFCHead((fpn, 7, 7), [fpn] * 4, [rep],
                                                norm_layer=torch.nn.BatchNorm2d),
        mask_head=tv_mask_rcnn.MaskRCNNHeads(fpn, [mask_ch] * 2, 1,
                                             norm_layer=torch.nn.BatchNorm2d))
  else:
    kwargs.update(box_head=faster_rcnn.TwoMLPHead(fpn * 49, rep),
                  mask_head=tv_mask_rcnn.MaskRCNNHeads(fpn, [mask_ch] * 2, 1))
  model = tv_mask_rcnn.MaskRCNN(
      backbone, num_classes=None,
      box_predictor=faster_rcnn.FastRCNNPredictor(rep, CLASSES),
      mask_predictor=tv_mask_rcnn.MaskRCNNPredictor(mask_ch, mask_ch, CLASSES), **kwargs)
  tm.randomize_biases(model, seed)
  if bn:
    tm.randomize_norms(model, seed)
  return model.train()


def _unfrozen(module: torch.nn.Module) -> torch.nn.Module:
  """Replaces every FrozenBatchNorm2d by a BatchNorm2d holding the same four arrays."""
  from torchvision.ops import misc as misc_ops  # pylint: disable=g-import-not-at-top
  for name, child in module.named_children():
    if isinstance(child, misc_ops.FrozenBatchNorm2d):
      norm = torch.nn.BatchNorm2d(child.weight.shape[0])
      with torch.no_grad():
        for k in ("weight", "bias", "running_mean", "running_var"):
          getattr(norm, k).copy_(getattr(child, k))
      setattr(module, name, norm)
    else:
      _unfrozen(child)
  return module


def torch_step(model: torch.nn.Module, batch, targets, *, backward: bool = True,
               dtype=torch.float32) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
  """torchvision's losses (our names) and, with ``backward``, ``{state-dict key: gradient}``
  (float32 numpy). ``dtype``: the model's (float64 gives the reference for rounding)."""
  x, sizes = torch_images(batch, dtype)
  targets = [dict(t, boxes=t["boxes"].to(dtype)) for t in targets]
  model.zero_grad(set_to_none=True)
  with torch.set_grad_enabled(backward):
    images = ImageList(x, sizes)
    feats = model.backbone(images.tensors)
    proposals, rpn_losses = model.rpn(images, feats, targets)
    _, roi_losses = model.roi_heads(feats, proposals, images.image_sizes, targets)
    losses = {**rpn_losses, **roi_losses}
    if backward:
      sum(losses.values()).backward()
  grads = {k: p.grad.numpy().astype(np.float64) for k, p in model.named_parameters()
           if backward and p.grad is not None}
  return {LOSS_NAMES[k]: float(v.detach()) for k, v in losses.items()}, grads


def batch_stats_of(model: torch.nn.Module, version: str):
  """The running statistics of ``model`` now, as our ``batch_stats`` tree."""
  variables, _ = _convert({k: v.numpy() for k, v in model.state_dict().items()}, version)
  return jax.tree.map(np.asarray, variables.get("batch_stats", {}))


def _convert(state: Dict[str, np.ndarray], version: str):
  """The converter on a state dict; v2 keeps every BatchNorm trainable, as in train mode."""
  if version == "v2":
    config = tv_convert.torchvision_maskrcnn_v2_config(tv_convert.canonical_keys(state),
                                                       head_norm="bn")
    config.norm = "bn"
    return convert.convert_torchvision_maskrcnn_v2(state, config=config)
  return convert.convert_torchvision_maskrcnn(state)


def converted(model: torch.nn.Module, version: str):
  """Our ``(variables, config)`` for ``model`` at the same sampler settings."""
  variables, config = _convert({k: v.numpy() for k, v in model.state_dict().items()}, version)
  rpn, roi = model.rpn, model.roi_heads
  config.backbone.trainable_layers = 3
  config.rpn.pre_nms_top_k_train = rpn._pre_nms_top_n["training"]  # pylint: disable=protected-access
  config.rpn.post_nms_top_k_train = rpn._post_nms_top_n["training"]  # pylint: disable=protected-access
  config.rpn.batch_size_per_image = rpn.fg_bg_sampler.batch_size_per_image
  config.rpn.positive_fraction = rpn.fg_bg_sampler.positive_fraction
  config.roi.batch_size_per_image = roi.fg_bg_sampler.batch_size_per_image
  config.roi.positive_fraction = roi.fg_bg_sampler.positive_fraction
  config.mask.rois_per_image = min(int(config.roi.batch_size_per_image *
                                       config.roi.positive_fraction), MASK_SLOTS)
  config.mask.target_sampling_ratio = MASK_TARGET_SAMPLES
  return variables, config


def our_losses_fn(config, mesh=None):
  """jit(variables, batch, key) -> (losses, grads w.r.t. params, stats)."""
  model = modeling.MaskRCNN(config, mesh=mesh)
  mutable = ["batch_stats"] if config.norm == "bn" else False

  def loss_fn(params, variables, batch, key):
    out = model.apply(dict(variables, params=params), batch, method=modeling.MaskRCNN.losses,
                      rngs={"sampling": key}, mutable=mutable)
    (losses, stats), updated = out if mutable else (out, {})
    return sum(losses.values()), (losses, stats, updated)

  def step(variables, batch, key):
    (_, (losses, stats, updated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], variables, batch, key)
    return losses, grads, stats, updated

  return jax.jit(step)


def our_step(variables, config, batch, key=None, mesh=None):
  """Our losses (floats), gradients (numpy tree), stats and updated ``batch_stats`` (if any)."""
  key = jax.random.PRNGKey(0) if key is None else key
  losses, grads, stats, updated = our_losses_fn(config, mesh)(
      variables, jax.tree.map(jnp.asarray, batch), key)
  return ({k: float(v) for k, v in losses.items()}, jax.tree.map(np.asarray, grads),
          {k: float(v) for k, v in stats.items()},
          jax.tree.map(np.asarray, updated.get("batch_stats")))


def converted_gradients(model: torch.nn.Module, grads: Dict[str, np.ndarray], version: str):
  """torchvision's gradients as our params tree (zeros where a parameter has none)."""
  state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
  params = dict(model.named_parameters())
  for k in state:
    if k in params:
      state[k] = grads.get(k, np.zeros_like(state[k]))
  variables, _ = _convert(state, version)
  return jax.tree.map(np.asarray, variables["params"])
