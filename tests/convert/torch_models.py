"""torchvision oracle models for the conversion tests (random weights, non-trivial BN)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from torchvision.models.detection import mask_rcnn
from torchvision.models.detection import backbone_utils
from torchvision.models.detection import faster_rcnn
from torchvision.models.detection import keypoint_rcnn
from torchvision.ops import misc as misc_ops

# The narrow FrozenBN body is the training benchmark's (shared, not copied).
from mrcnn_jax.benchmarks.torchvision_reference import narrow_resnet_body


def randomize_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Gives every (Frozen)BatchNorm random statistics and affine, so a wrong mapping shows."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, (torch.nn.BatchNorm2d, misc_ops.FrozenBatchNorm2d)):
      c = m.weight.shape[0]
      with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
  return model


def randomize_biases(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
  """Non-zero conv/linear biases (torchvision initialises most to zero)."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
      if m.bias is not None:
        with torch.no_grad():
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * scale)
  return model


def maskrcnn_v1(seed: int = 0, num_classes: int = 91) -> torch.nn.Module:
  """``maskrcnn_resnet50_fpn`` (v1), random weights and BN statistics, eval mode."""
  torch.manual_seed(seed)
  m = mask_rcnn.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                      num_classes=num_classes)
  return randomize_biases(randomize_norms(m, seed), seed).eval()


def small_maskrcnn(seed: int = 0, num_classes: int = 4, size: int = 128, width: int = 16,
                   fpn: int = 64, rep: int = 128, mask_ch: int = 64,
                   calibration=None) -> torch.nn.Module:
  """A narrow torchvision ``MaskRCNN``: :func:`narrow_resnet_body`, FPN ``fpn`` channels, box
  MLP ``rep`` wide, two mask convs; torchvision's own classes throughout. Its transform is set
  so a ``size`` x ``size`` image is neither resized nor padded, and the training-time proposal
  and RoI counts are cut so a few SGD steps take seconds."""
  torch.manual_seed(seed)
  body = narrow_resnet_body(width, calibration=calibration)
  chans = [width * 4 * 2**i for i in range(4)]
  backbone = backbone_utils.BackboneWithFPN(
      body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, chans, fpn)
  model = mask_rcnn.MaskRCNN(
      backbone, num_classes=None, min_size=size, max_size=size,
      rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=300,
      box_batch_size_per_image=128,
      box_head=faster_rcnn.TwoMLPHead(fpn * 49, rep),
      box_predictor=faster_rcnn.FastRCNNPredictor(rep, num_classes),
      mask_head=mask_rcnn.MaskRCNNHeads(fpn, [mask_ch, mask_ch], 1),
      mask_predictor=mask_rcnn.MaskRCNNPredictor(mask_ch, mask_ch, num_classes))
  model.transform.size_divisible = 64
  for p in model.backbone.body.parameters():
    p.requires_grad_(False)  # a random, calibrated feature extractor; the rest trains
  return model


def small_keypointrcnn(seed: int = 0, num_classes: int = 2, num_keypoints: int = 4,
                       size: int = 128, width: int = 16, fpn: int = 64, rep: int = 128,
                       keypoint_channels=(32, 32), calibration=None,
                       **kwargs) -> torch.nn.Module:
  """A narrow torchvision ``KeypointRCNN``, as :func:`small_maskrcnn`: the same body, FPN and
  box head, then ``KeypointRCNNHeads(fpn, keypoint_channels)`` and a ``KeypointRCNNPredictor``
  for ``num_keypoints``. ``kwargs`` go to ``KeypointRCNN`` (sampler sizes, thresholds) over
  :func:`small_maskrcnn`'s cut proposal and RoI counts; the transform neither resizes nor pads
  a ``size`` x ``size`` image; the body is frozen."""
  torch.manual_seed(seed)
  body = narrow_resnet_body(width, calibration=calibration)
  chans = [width * 4 * 2**i for i in range(4)]
  backbone = backbone_utils.BackboneWithFPN(
      body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, chans, fpn)
  options = dict(min_size=size, max_size=size, rpn_pre_nms_top_n_train=300,
                 rpn_post_nms_top_n_train=300, box_batch_size_per_image=128)
  options.update(kwargs)
  model = keypoint_rcnn.KeypointRCNN(
      backbone, num_classes=None,
      box_head=faster_rcnn.TwoMLPHead(fpn * 49, rep),
      box_predictor=faster_rcnn.FastRCNNPredictor(rep, num_classes),
      keypoint_head=keypoint_rcnn.KeypointRCNNHeads(fpn, list(keypoint_channels)),
      keypoint_predictor=keypoint_rcnn.KeypointRCNNPredictor(keypoint_channels[-1],
                                                             num_keypoints),
      **options)
  model.transform.size_divisible = 64
  for p in model.backbone.body.parameters():
    p.requires_grad_(False)
  return model


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref| (float64)."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
  """Runs ``scripts/<script>`` on one CPU device (no fake devices); asserts exit status 0."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two boolean masks (1 when both are empty)."""
  union = np.logical_or(a, b).sum()
  return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two xyxy boxes."""
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(rb - lt, 0, None))
  area = lambda x: np.prod(x[2:] - x[:2])  # noqa: E731
  return inter / (area(a) + area(b) - inter)


def to_torch(images) -> list:
  """uint8 [H, W, 3] numpy images -> torchvision's input: float [3, H, W] tensors in 0..1."""
  return [torch.from_numpy(i).permute(2, 0, 1).float() / 255.0 for i in images]


def normalized(images) -> torch.Tensor:
  """[N, 3, H, W] of the images as torchvision's transform normalises them (ImageNet mean/std):
  what ``calibration`` of the small_* builders expects."""
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  return (torch.stack(to_torch(images)) - mean) / std


def train_briefly(model: torch.nn.Module, images, targets, steps: int,
                  batch_size: int = 2) -> torch.nn.Module:
  """``steps`` SGD steps (momentum 0.9, weight decay 1e-4, gradients clipped at norm 10) over
  consecutive batches of ``images`` / ``targets``, then eval mode: scores that are not noise."""
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
  model.train()
  for step in range(steps):
    batch = slice(batch_size * step, batch_size * (step + 1))
    losses = model(to_torch(images[batch]), targets[batch])
    opt.zero_grad()
    sum(losses.values()).backward()
    torch.nn.utils.clip_grad_norm_(params, 10.0)
    opt.step()
  return model.eval()


def paint_scene(rng: np.random.Generator, size: int, draw_shape):
  """A noisy dark [size, size] background with 1-3 bright shapes painted in turn.

  ``draw_shape(rng)`` -> ([size, size] bool mask, label). Returns (uint8 image [size, size, 3],
  the shapes' modal masks (what later shapes leave visible), their labels)."""
  img = np.empty((size, size, 3), np.float32)
  img[:] = rng.uniform(0, 90, size=3)
  img += rng.normal(0, 6, size=img.shape)
  masks, labels = [], []
  for _ in range(rng.integers(1, 4)):
    m, label = draw_shape(rng)
    img[m] = rng.uniform(120, 255, size=3)
    masks = [prev & ~m for prev in masks] + [m]
    labels.append(label)
  return np.clip(img, 0, 255).astype(np.uint8), masks, labels
