"""torchvision's side of the benchmarks: the one module of the package that imports torch.

Imported only by the entry points that compare against torchvision (``scripts/benchmark.py``,
``scripts/benchmark_ops.py``, and through ``training_vs_torchvision``
``scripts/compare_training.py``), which load torch before anything imports TensorFlow:
torchvision segfaults when it is imported after TensorFlow.

The model is ``maskrcnn_resnet50_fpn`` built in the configuration our default config mirrors:
FrozenBatchNorm2d and three trainable backbone stages (the builder switches to BatchNorm2d
with every layer trainable when ``weights_backbone=None``; that variant's train step is timed
too, as "builder default", for reference). The training comparison builds a narrow model
from our model config instead (:func:`narrow_maskrcnn`) and trains it with torchvision's recipe
(:func:`train_steps`).
"""

# torchvision segfaults if imported after TensorFlow: load it before anything else.
import torch  # noqa: I001
import torchvision
from torchvision.models.detection import anchor_utils
from torchvision.models.detection import backbone_utils
from torchvision.models.detection import faster_rcnn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.ops import misc as tv_misc

import functools
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import ml_collections
import numpy as np

from mrcnn_jax.benchmarks import model_vs_torchvision
from mrcnn_jax.benchmarks import timing

NUM_CLASSES = 91


def torchvision_model(min_size: int, max_size: int, matched: bool = True) -> torch.nn.Module:
  """torchvision's Mask R-CNN R50-FPN, random weights; ``matched``: as our default config
  (FrozenBatchNorm2d, three trainable stages), else the builder's default without weights."""
  if not matched:
    return tv_mask_rcnn.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                              min_size=min_size, max_size=max_size)
  trunk = torchvision.models.resnet50(weights=None, norm_layer=tv_misc.FrozenBatchNorm2d)
  backbone = backbone_utils._resnet_fpn_extractor(trunk, 3)  # pylint: disable=protected-access
  return tv_mask_rcnn.MaskRCNN(backbone, num_classes=NUM_CLASSES, min_size=min_size,
                               max_size=max_size)


def torchvision_detect(model: torch.nn.Module, images: List[torch.Tensor]) -> List[dict]:
  """torchvision's eval forward up to the outputs our ``predict`` returns, per image: boxes,
  scores, labels and the predicted class's 28x28 mask probabilities ([N, 1, 28, 28]).

  ``model(images)`` does this and then ``transform.postprocess``: it scales the boxes back to
  the input size (a no-op here: the transform does not resize) and pastes every mask into an
  image-sized [N, 1, H, W] array (``paste_masks_in_image``). ``predict`` leaves pasting to its
  caller (``inference.Predictor`` and the evaluator paste on the host), so the like-for-like
  time is this one; the whole call is timed beside it.
  """
  image_list, _ = model.transform(images)
  features = model.backbone(image_list.tensors)
  proposals, _ = model.rpn(image_list, features)
  detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
  return detections


def sync(device: torch.device) -> None:
  """Waits for the device's queued work, so a timed run ends when its results exist (CUDA runs
  asynchronously, as JAX's dispatch does)."""
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def torch_inputs(batch: dict) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
  """A synthetic host batch (``synthetic.train_batch``) as torchvision's images [3, H, W]
  float in [0, 1] and targets (boxes, labels, image-sized box masks of the valid instances)."""
  images, boxes, classes, valid = (batch[k] for k in ("image", "gt_boxes", "gt_classes",
                                                      "gt_valid"))
  height, width = images.shape[1:3]
  tv_images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]
  tv_targets = []
  for b in range(images.shape[0]):
    n = int(valid[b].sum())
    masks = torch.zeros((n, height, width), dtype=torch.uint8)
    for i in range(n):
      x0, y0, x1, y1 = boxes[b, i].astype(int)
      masks[i, y0:y1, x0:x1] = 1
    tv_targets.append({"boxes": torch.from_numpy(boxes[b, :n]),
                       "labels": torch.from_numpy(classes[b, :n]).long(), "masks": masks})
  return tv_images, tv_targets


def train(matched: bool, device: str) -> Callable[[], None]:
  """Returns a function running one torchvision train step (forward, backward, SGD) on the
  synthetic batch the JAX step takes."""
  torch.manual_seed(0)
  device = torch.device(device)
  size = model_vs_torchvision.TRAIN_SIZE
  model = torchvision_model(min(size), max(size), matched).train().to(device)
  images, targets = torch_inputs(model_vs_torchvision.training_batch(
      np.random.default_rng(0), max_instances=100, mask_size=28))
  images = [im.to(device) for im in images]
  targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

  def run():
    losses = model(images, targets)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    sync(device)

  return run


def infer(rows: dict, key: str, height: int, width: int,
          device: str) -> Tuple[Callable[[], object], Callable[[], object]]:
  """Two functions running torchvision inference once, on one model: its forward to our
  ``predict``'s outputs (:func:`torchvision_detect`), and the whole ``model(images)`` call.
  The detection count goes to ``rows[key + '_detections']``."""
  torch.manual_seed(0)
  device = torch.device(device)
  model = torchvision_model(min(height, width), max(height, width)).eval().to(device)
  image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
  # On the device before timing, as the JAX side's image is.
  images = [(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0).to(device)]

  def timed(forward):
    def run():
      with torch.inference_mode():
        out = forward(images)
      sync(device)
      return out
    return run

  detect, full = timed(functools.partial(torchvision_detect, model)), timed(model)
  # One call of the whole model here would only be a second warm-up (median_times warms both).
  rows[key + "_detections"] = len(detect()[0]["boxes"])
  return detect, full


def measure(options: model_vs_torchvision.Options) -> dict:
  """Every torchvision measurement, in this process: {key: (wall s, CPU s) or a count}.

  ``options.torch_device`` must be resolved.
  """
  rows, repeats, device = {}, options.repeats, options.torch_device
  if not options.skip_train:
    rows["train"] = timing.median_times([train(True, device)], repeats)[0][0]
    rows["train_builder_default"] = timing.median_times([train(False, device)], repeats)[0][0]
  for key, h, w in model_vs_torchvision.INFER_SIZES:
    (rows[key], rows[key + "_full"]), _ = timing.median_times(infer(rows, key, h, w, device),
                                                              repeats)
  return rows


# ------------------------------------------------------------------------------------------------
# Ops (``ops``)
# ------------------------------------------------------------------------------------------------


def multiscale_roi_align(features: Sequence[np.ndarray], boxes: np.ndarray, output_size: int,
                         image_size: Tuple[int, int],
                         sampling_ratio: int = 2) -> Callable[[], torch.Tensor]:
  """``torchvision.ops.MultiScaleRoIAlign`` over P2-P5 (aligned=False), ready to run.

  Args:
    features: per level [1, H_l, W_l, C] float32 (NHWC, as ours; transposed here).
    boxes: [N, 4] float32, xyxy pixels.
    output_size: pooled side.
    image_size: (height, width) the levels were made from (sets each level's scale).
    sampling_ratio: samples per bin side.

  Returns:
    A function returning the pooled [N, C, S, S] tensor.
  """
  names = [f"p{i + 2}" for i in range(len(features))]
  pooler = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)
  x = {n: torch.from_numpy(f).permute(0, 3, 1, 2).contiguous() for n, f in zip(names, features)}
  tb = torch.from_numpy(boxes)
  return lambda: pooler(x, [tb], [tuple(image_size)])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> Callable[[], torch.Tensor]:
  """``torchvision.ops.nms`` of ``boxes`` [N, 4] xyxy, ``scores`` [N], ready to run; the
  function returns the kept indices, best first."""
  tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
  return lambda: torchvision.ops.nms(tb, ts, iou_threshold)


# ------------------------------------------------------------------------------------------------
# Training (``training_vs_torchvision``)
# ------------------------------------------------------------------------------------------------

# torchvision's loss names -> ours (``training.train_step.LOSS_KEYS``).
LOSS_NAMES = {"loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_box",
              "loss_classifier": "roi_class", "loss_box_reg": "roi_box", "loss_mask": "roi_mask"}
# torchvision's ``_resnet_fpn_extractor`` order: ``trainable_layers`` = n trains the first n.
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def narrow_resnet_body(width: int = 16, blocks=(1, 1, 1, 1),
                       calibration: torch.Tensor = None) -> torch.nn.Module:
  """torchvision's ResNet layout (``conv1``, ``bn1``, ``layerN.i`` of torchvision
  ``Bottleneck`` blocks, FrozenBatchNorm2d) with ``width`` stem channels instead of 64, so it
  trains in seconds on a CPU; convs initialised as torchvision's ResNet does (He, fan-out).

  With ``calibration`` ([N, 3, H, W] normalised images), every norm layer's statistics are
  those of its input on that batch (then frozen), so the random body yields unit-scale
  features and the heads can be trained on top of it in a few steps.
  """
  norm = torch.nn.BatchNorm2d
  bottleneck = torchvision.models.resnet.Bottleneck
  body = torch.nn.Module()
  body.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
  body.bn1 = norm(width)
  body.relu = torch.nn.ReLU(inplace=True)
  body.maxpool = torch.nn.MaxPool2d(3, 2, 1)
  inplanes = width
  for i, n in enumerate(blocks):
    planes, stride = width * 2**i, 1 if i == 0 else 2
    layers = []
    for j in range(n):
      down = None
      if j == 0 and (stride != 1 or inplanes != planes * 4):
        down = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                   norm(planes * 4))
      layers.append(bottleneck(inplanes, planes, stride if j == 0 else 1, down, norm_layer=norm))
      inplanes = planes * 4
    setattr(body, f"layer{i + 1}", torch.nn.Sequential(*layers))
  for m in body.modules():
    if isinstance(m, torch.nn.Conv2d):
      torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # a cumulative average: one pass sets the batch statistics
  if calibration is not None:
    body.train()
    with torch.no_grad():
      x = body.maxpool(body.relu(body.bn1(body.conv1(calibration))))
      for i in range(len(blocks)):
        x = getattr(body, f"layer{i + 1}")(x)
  _freeze_norms(body)
  return body.eval()


def _freeze_norms(module: torch.nn.Module) -> None:
  """Replaces every BatchNorm2d by a FrozenBatchNorm2d with the same four arrays."""
  for name, child in module.named_children():
    if isinstance(child, torch.nn.BatchNorm2d):
      frozen = tv_misc.FrozenBatchNorm2d(child.num_features)
      for k in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, k).copy_(getattr(child, k).detach())
      setattr(module, name, frozen)
    else:
      _freeze_norms(child)


def image_tensor(image: np.ndarray) -> torch.Tensor:
  """[h, w, 3] uint8 -> torchvision's [3, h, w] float32 in [0, 1]."""
  return torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 255.0


def calibration_batch(images: Sequence[np.ndarray], size: int,
                      config: ml_collections.ConfigDict) -> torch.Tensor:
  """[h, w, 3] uint8 images normalised with ``config.pixel_mean`` / ``pixel_std`` and
  zero-padded to ``size`` squared, as torchvision's transform batches them: [N, 3, size, size]."""
  mean = torch.tensor(config.pixel_mean).view(3, 1, 1) / 255.0
  std = torch.tensor(config.pixel_std).view(3, 1, 1) / 255.0
  out = torch.zeros((len(images), 3, size, size))
  for i, image in enumerate(images):
    im = image_tensor(image)
    out[i, :, :im.shape[1], :im.shape[2]] = (im - mean) / std
  return out


def narrow_maskrcnn(config: ml_collections.ConfigDict, image_size: int,
                    calibration_images: Sequence[np.ndarray], seed: int) -> tv_mask_rcnn.MaskRCNN:
  """torchvision's ``MaskRCNN`` (v1 layout) built to ``config`` (``config.model``), random
  weights drawn from torch's global RNG seeded with ``seed``.

  The body is :func:`narrow_resnet_body` (``backbone.width``, ``backbone.stage_blocks``, its
  frozen statistics those of ``calibration_images``, see :func:`calibration_batch`) with
  torchvision's ``trainable_layers`` rule; FPN, heads, anchors, samplers, thresholds and the
  detection count are the config's, the heads initialised as torchvision initialises them. The
  transform neither resizes nor pads an image of at most ``image_size`` per side: min and max
  size ``image_size`` (scale 1 for any such image with one side equal to it) and padding to a
  multiple of ``image_size``, i.e. to ``image_size`` squared, as our static input.
  """
  if config.norm != "frozen_bn" or config.rpn.head_convs != 1 or config.roi.box_head_convs:
    raise ValueError("narrow_maskrcnn builds the v1 layout with a FrozenBatchNorm2d body")
  torch.manual_seed(seed)
  b, r, ro, m = config.backbone, config.rpn, config.roi, config.mask
  body = narrow_resnet_body(b.width, tuple(b.stage_blocks),
                            calibration_batch(calibration_images, image_size, config))
  trainable = _TRAINABLE_ORDER[:b.trainable_layers]
  for name, p in body.named_parameters():
    p.requires_grad_(name.startswith(trainable))
  channels = [b.width * 4 * 2**i for i in range(len(b.stage_blocks))]
  backbone = backbone_utils.BackboneWithFPN(
      body, {f"layer{i + 1}": str(i) for i in range(len(channels))}, channels,
      config.fpn.channels)
  anchors = anchor_utils.AnchorGenerator(tuple(tuple(s) for s in config.anchors.sizes),
                                         (tuple(config.anchors.aspect_ratios),) * 5)
  fpn, convs, classes = config.fpn.channels, list(m.conv_channels), config.num_classes
  model = tv_mask_rcnn.MaskRCNN(
      backbone, num_classes=None, min_size=image_size, max_size=image_size,
      image_mean=[v / 255.0 for v in config.pixel_mean],
      image_std=[v / 255.0 for v in config.pixel_std],
      rpn_anchor_generator=anchors,
      rpn_pre_nms_top_n_train=r.pre_nms_top_k_train, rpn_pre_nms_top_n_test=r.pre_nms_top_k_test,
      rpn_post_nms_top_n_train=r.post_nms_top_k_train,
      rpn_post_nms_top_n_test=r.post_nms_top_k_test, rpn_nms_thresh=r.nms_threshold,
      rpn_fg_iou_thresh=r.fg_iou_threshold, rpn_bg_iou_thresh=r.bg_iou_threshold,
      rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
      rpn_score_thresh=r.score_threshold,
      box_score_thresh=ro.score_threshold, box_nms_thresh=ro.nms_threshold,
      box_detections_per_img=config.detections_per_image,
      box_fg_iou_thresh=ro.fg_iou_threshold, box_bg_iou_thresh=ro.bg_iou_threshold,
      box_batch_size_per_image=ro.batch_size_per_image,
      box_positive_fraction=ro.positive_fraction, bbox_reg_weights=tuple(ro.box_weights),
      box_head=faster_rcnn.TwoMLPHead(fpn * ro.pooler_size**2, ro.representation_size),
      box_predictor=faster_rcnn.FastRCNNPredictor(ro.representation_size, classes),
      mask_head=tv_mask_rcnn.MaskRCNNHeads(fpn, convs, 1),
      mask_predictor=tv_mask_rcnn.MaskRCNNPredictor(convs[-1], convs[-1], classes))
  model.transform.size_divisible = image_size
  return model


def torch_targets(examples: Sequence[Mapping[str, np.ndarray]]
                  ) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
  """Examples in original pixels (``data.CocoSource.load``'s ``image``, ``boxes`` xyxy,
  ``classes`` 1..K, full-image ``masks`` [N, h, w]) -> torchvision's images and targets."""
  images = [image_tensor(e["image"]) for e in examples]
  targets = [{"boxes": torch.tensor(np.asarray(e["boxes"], np.float32).reshape(-1, 4)),
              "labels": torch.tensor(np.asarray(e["classes"], np.int64)),
              "masks": torch.tensor(np.asarray(e["masks"], np.uint8))} for e in examples]
  return images, targets


def train_steps(model: torch.nn.Module,
                batches: Iterable[Sequence[Mapping[str, np.ndarray]]],
                train_config: ml_collections.ConfigDict, seed: int) -> Dict[str, List[float]]:
  """Trains ``model`` one SGD step per batch (a list of examples, see :func:`torch_targets`),
  with torchvision's detection recipe as ``train_config`` (``config.train``) sets it; its
  samplers draw from torch's global RNG, seeded with ``seed``.

  SGD with momentum on the parameters that require gradients; a linear warm-up
  (``LinearLR``) chained with step decay (``MultiStepLR``), stepped every iteration; optional
  global-norm clipping (``grad_clip_norm`` > 0). Weight decay goes to parameters of 2 or more
  dims only, two parameter groups as our optimizer's ``weight_decay_mask`` splits them
  (torchvision's reference decays biases too).

  Returns:
    Per step: the five losses under our names, ``total_loss`` and ``learning_rate`` (the rate
    the step used).
  """
  t = train_config
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  peak = t.base_learning_rate * t.batch_size / t.base_batch_size
  opt = torch.optim.SGD(groups, lr=peak, momentum=t.momentum)
  sched = torch.optim.lr_scheduler.ChainedScheduler([
      torch.optim.lr_scheduler.LinearLR(opt, start_factor=t.warmup_factor,
                                        total_iters=t.warmup_steps),
      torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.decay_steps),
                                           gamma=t.decay_factor)])
  record = {k: [] for k in list(LOSS_NAMES.values()) + ["total_loss", "learning_rate"]}
  torch.manual_seed(seed)
  model.train()
  for examples in batches:
    images, targets = torch_targets(examples)
    losses = model(images, targets)
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    if t.grad_clip_norm and t.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm)
    record["learning_rate"].append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
    for name, value in losses.items():
      record[LOSS_NAMES[name]].append(value.item())
    record["total_loss"].append(total.item())
  return record


def detect_arrays(model: torch.nn.Module, images: Sequence[np.ndarray],
                  detections: int) -> Dict[str, np.ndarray]:
  """torchvision's eval forward (:func:`torchvision_detect`) on [h, w, 3] uint8 images, as our
  ``predict``'s dict: ``boxes`` [B, D, 4] xyxy, ``scores``, ``classes``, ``masks``
  [B, D, 28, 28] probabilities of the predicted class, ``valid`` [B, D]; D = ``detections``."""
  with torch.inference_mode():
    found = torchvision_detect(model.eval(), [image_tensor(im) for im in images])
  b = len(images)
  res = found[0]["masks"].shape[-1]  # [N, 1, 28, 28], N = 0 included
  out = {"boxes": np.zeros((b, detections, 4), np.float32),
         "scores": np.zeros((b, detections), np.float32),
         "classes": np.zeros((b, detections), np.int32),
         "masks": np.zeros((b, detections, res, res), np.float32),
         "valid": np.zeros((b, detections), bool)}
  for i, det in enumerate(found):
    n = len(det["scores"])
    out["boxes"][i, :n] = det["boxes"].numpy()
    out["scores"][i, :n] = det["scores"].numpy()
    out["classes"][i, :n] = det["labels"].numpy()
    out["masks"][i, :n] = det["masks"][:, 0].numpy()
    out["valid"][i, :n] = True
  return out


def versions() -> Dict[str, str]:
  return {"torch": torch.__version__, "torchvision": torchvision.__version__}
