"""torchvision's side of the benchmarks: the one module of the package that imports torch.

Imported only by the entry points that compare against torchvision (``scripts/benchmark.py``,
``scripts/benchmark_ops.py``), which load torch before anything imports TensorFlow: torchvision
segfaults when it is imported after TensorFlow.

The model is ``maskrcnn_resnet50_fpn`` built in the configuration our default config mirrors:
FrozenBatchNorm2d and three trainable backbone stages (the builder switches to BatchNorm2d
with every layer trainable when ``weights_backbone=None``; that variant's train step is timed
too, as "builder default", for reference).
"""

# torchvision segfaults if imported after TensorFlow: load it before anything else.
import torch  # noqa: I001
import torchvision
from torchvision.models.detection import backbone_utils
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.ops import misc as tv_misc

import functools
from typing import Callable, Dict, List, Sequence, Tuple

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
