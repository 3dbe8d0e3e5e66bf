"""Second stage: RoI sampling, box head, mask head and detection post-processing.

Modules mirror torchvision's ``RoIHeads`` parts and names: :class:`TwoMLPHead` (``fc6``,
``fc7``), :class:`FastRCNNPredictor` (``cls_score``, ``bbox_pred``), :class:`MaskRCNNHead`
(``mask_fcn1..4``) and :class:`MaskRCNNPredictor` (``conv5_mask``, ``mask_fcn_logits``).
Converter notes: ``fc6`` flattens RoI features in NHWC order (torch flattens CHW), and
``conv5_mask`` is a Flax ``ConvTranspose``: its kernel is torch's ``[in, out, kh, kw]`` weight
transposed to ``[kh, kw, in, out]`` and flipped in both spatial axes.

Pure per-image functions (vmap them): :func:`sample_rois` (append GT, match at IoU 0.5,
sample 512 with <= 25% foreground, targets) and :func:`detect` (softmax, per-class decode, clip,
score threshold, class-aware NMS, top-k); :func:`detect_batch` is ``detect`` for a batch.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import layers
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.matching import match_boxes
from mrcnn_jax.ops.nms import batched_nms
from mrcnn_jax.ops.sampling import sample_balanced

# torch.nn.Linear's default init: weight and bias U(+-1/sqrt(fan_in)).
linear_init = nn.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform")
# torchvision's mask head: kaiming_normal_(mode="fan_out", nonlinearity="relu"), bias 0.
mask_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch counts a ConvTranspose2d weight [in, out, kh, kw]'s "fan_out" as in * kh * kw, which is
# Flax's fan_in for the HWIO kernel.
deconv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _linear_bias_init(fan_in: int):
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dense(features: int, fan_in: int, dtype: Any, name: str) -> layers.Dense:
  return layers.Dense(features, kernel_init=linear_init, bias_init=_linear_bias_init(fan_in),
                  dtype=dtype, param_dtype=jnp.float32, name=name)


class TwoMLPHead(nn.Module):
  """Flatten, fc6, ReLU, fc7, ReLU: [..., h, w, C] -> [..., representation_size].

  Called like every RoI head, ``(x, train, valid)``; it has no state that depends on them.
  """

  representation_size: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               valid: Optional[jax.Array] = None) -> jax.Array:
    del train, valid
    x = x.reshape(x.shape[:-3] + (-1,))
    x = nn.relu(_dense(self.representation_size, x.shape[-1], self.dtype, "fc6")(x))
    return nn.relu(_dense(self.representation_size, self.representation_size, self.dtype,
                          "fc7")(x))


class FastRCNNPredictor(nn.Module):
  """Class logits [..., K+1] and class-specific deltas [..., K+1, 4], both float32."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    fan_in = x.shape[-1]
    logits = _dense(self.num_classes, fan_in, self.dtype, "cls_score")(x)
    deltas = _dense(4 * self.num_classes, fan_in, self.dtype, "bbox_pred")(x)
    deltas = deltas.reshape(deltas.shape[:-1] + (self.num_classes, 4))
    return logits.astype(jnp.float32), deltas.astype(jnp.float32)


class MaskRCNNHead(nn.Module):
  """``len(channels)`` 3x3 conv + ReLU layers: [N, 14, 14, C] -> [N, 14, 14, channels[-1]].

  Parameters are Flax ``Conv``'s (``mask_fcn{i}``: ``kernel`` [3, 3, Cin, C], ``bias``).
  ``conv`` is the layer class (``KernelSet.conv``). Called like every RoI head,
  ``(x, train, valid)``; it has no state that depends on them.
  """

  channels: Sequence[int] = (256, 256, 256, 256)
  dtype: Any = jnp.float32
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               valid: Optional[jax.Array] = None) -> jax.Array:
    del train, valid
    for i, c in enumerate(self.channels):
      x = nn.relu(self.conv(c, (3, 3), padding=((1, 1), (1, 1)), kernel_init=mask_conv_init,
                            bias_init=nn.initializers.zeros, dtype=self.dtype,
                            param_dtype=jnp.float32, name=self.layer_name(i))(x))
    return x

  def layer_name(self, i: int) -> str:
    """The parameter name of conv ``i`` (0-based): torchvision's ``mask_fcn{i + 1}``."""
    return f"mask_fcn{i + 1}"


class MaskRCNNPredictor(nn.Module):
  """2x2 stride-2 deconv + ReLU + 1x1 conv: [N, 14, 14, C] -> [N, 28, 28, K+1] float32 logits.

  ``conv5_mask`` is a Flax ``ConvTranspose`` (kernel [2, 2, C, C]), ``mask_fcn_logits`` a 1x1
  ``Conv`` (kernel [1, 1, C, K+1]).
  """

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, classes: Optional[jax.Array] = None) -> jax.Array:
    """x: [N, h, w, C]; classes: optional [N] int32.

    Returns:
      [N, 2h, 2w, K+1] float32 logits, or [N, 2h, 2w] of class ``classes[n]`` when given.
    """
    c = x.shape[-1]
    x = layers.ConvTranspose(c, (2, 2), strides=(2, 2), padding="VALID",
                             kernel_init=deconv_init, dtype=self.dtype,
                             param_dtype=jnp.float32, name="conv5_mask")(x)
    x = layers.Conv(self.num_classes, (1, 1), kernel_init=mask_conv_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name="mask_fcn_logits")(nn.relu(x))
    logits = x.astype(jnp.float32)
    if classes is None:
      return logits
    return jnp.take_along_axis(logits, classes.astype(jnp.int32)[:, None, None, None],
                               axis=-1)[..., 0]


def sample_rois(
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    key: jax.Array,
    *,
    fg_iou_threshold: float,
    bg_iou_threshold: float,
    batch_size_per_image: int,
    positive_fraction: float,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
) -> Dict[str, jax.Array]:
  """Training RoIs of one image (torchvision ``RoIHeads.select_training_samples``).

  GT boxes are appended to the proposals, every candidate is matched to the GT (Matcher
  ``fg_iou_threshold``/``bg_iou_threshold``, no low-quality matches), and a fixed
  ``batch_size_per_image`` are sampled, positives first.

  Args:
    proposals: [P, 4] float32 xyxy; proposal_valid: [P] bool.
    gt_boxes: [G, 4] float32 xyxy; gt_classes: [G] int32 (1..K); gt_valid: [G] bool.
    key: PRNG key for the sampler.

  Returns:
    dict, R = batch_size_per_image: ``rois`` [R, 4] float32, ``valid`` [R] bool, ``labels``
    [R] int32 (GT class, 0 background or padding), ``matched`` [R] int32 GT index (0 where not
    foreground), ``target`` [R, 4] float32 deltas (0 where not foreground).
  """
  boxes = jnp.concatenate([proposals, gt_boxes.astype(jnp.float32)], axis=0)
  cand_valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
  iou = box_ops.box_iou(gt_boxes, boxes)  # [G, P + G]
  matched = match_boxes(iou, fg_iou_threshold, bg_iou_threshold, False, gt_valid)
  labels = jnp.where(matched >= 0, 1, jnp.where(matched == -1, 0, -1))
  labels = jnp.where(cand_valid, labels, -1).astype(jnp.int32)  # padding is never sampled
  index, valid = sample_balanced(labels, int(batch_size_per_image), positive_fraction, key)
  fg = valid & (labels[index] == 1)
  gt_idx = jnp.where(fg, jnp.maximum(matched[index], 0), 0)
  rois = jnp.where(valid[:, None], boxes[index], 0.0)
  target = box_ops.encode_boxes(gt_boxes[gt_idx], rois, weights)
  target = jnp.where(fg[:, None], target, 0.0)
  cls = jnp.where(fg, gt_classes[gt_idx], 0).astype(jnp.int32)
  return dict(rois=rois, valid=valid, labels=cls, matched=gt_idx, target=target)


def detection_candidates(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    valid_size: jax.Array,
    *,
    weights: Sequence[float],
    score_threshold: float,
    min_size: float,
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Every (proposal, foreground class) pair of one image as a candidate detection.

  Args:
    class_logits: [R, K+1] float32; box_deltas: [R, K+1, 4] float32.
    proposals: [R, 4] float32 xyxy; proposal_valid: [R] bool.
    valid_size: [2] (h, w): boxes are clipped to it.

  Returns:
    ``(boxes [R*K, 4], probs [R*K], classes [R*K] int32 (1..K), scores [R*K])``: the decoded,
    clipped box, softmax probability and class of each pair, and its NMS score: the
    probability where it passes ``score_threshold`` and ``min_size`` (and its proposal is
    valid), ``-inf`` where it is not a candidate.
  """
  num_classes = class_logits.shape[-1]
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]  # [R, K]
  boxes = box_ops.decode_boxes(box_deltas[:, 1:], proposals[:, None, :], weights)  # [R, K, 4]
  boxes = box_ops.clip_boxes(boxes, valid_size)
  classes = jnp.broadcast_to(jnp.arange(1, num_classes, dtype=jnp.int32), probs.shape)
  boxes, probs, classes = boxes.reshape(-1, 4), probs.reshape(-1), classes.reshape(-1)
  ok = ((probs > score_threshold) & box_ops.small_box_mask(boxes, min_size)
        & jnp.repeat(proposal_valid, num_classes - 1))
  return boxes, probs, classes, jnp.where(ok, probs, -jnp.inf)


def select_detections(boxes: jax.Array, probs: jax.Array, classes: jax.Array,
                      scores: jax.Array, *, nms_threshold: float, detections: int,
                      pre_nms_top_k: Optional[int] = None) -> Dict[str, jax.Array]:
  """Class-aware NMS over one image's candidates (:func:`detection_candidates`), best first.

  ``pre_nms_top_k``: if set, only the best this many candidates enter the NMS.
  Returns the dict of :func:`detect`.
  """
  if pre_nms_top_k is not None and pre_nms_top_k < scores.shape[0]:
    # Best first, equal scores in index order: the order NMS's stable sort gives them.
    scores, top = jax.lax.top_k(scores, int(pre_nms_top_k))
    boxes, probs, classes = boxes[top], probs[top], classes[top]
  kept = batched_nms(boxes, scores, classes, nms_threshold, int(detections))
  valid = kept >= 0
  safe = jnp.maximum(kept, 0)
  return dict(boxes=jnp.where(valid[:, None], boxes[safe], 0.0),
              scores=jnp.where(valid, probs[safe], 0.0),
              classes=jnp.where(valid, classes[safe], 0),
              valid=valid)


def detect(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    valid_size: jax.Array,
    *,
    weights: Sequence[float],
    score_threshold: float,
    nms_threshold: float,
    min_size: float,
    detections: int,
    pre_nms_top_k: Optional[int] = None,
) -> Dict[str, jax.Array]:
  """Final detections of one image (torchvision ``RoIHeads.postprocess_detections``).

  Every (proposal, foreground class) pair is a candidate box; those scoring above
  ``score_threshold`` with non-tiny boxes go through a class-aware NMS, best first.
  (:func:`detect_batch` is the same for a batch of images, faster.)

  Args:
    class_logits: [R, K+1] float32; box_deltas: [R, K+1, 4] float32.
    proposals: [R, 4] float32 xyxy; proposal_valid: [R] bool.
    valid_size: [2] (h, w): boxes are clipped to it.
    pre_nms_top_k: if set, only the best this many candidates enter the NMS (a static-shape
      cap; torchvision keeps all above the threshold).

  Returns:
    dict with ``boxes`` [D, 4] float32, ``scores`` [D] float32, ``classes`` [D] int32 (1..K),
    ``valid`` [D] bool; padding rows are zero (class 0).
  """
  candidates = detection_candidates(class_logits, box_deltas, proposals, proposal_valid,
                                    valid_size, weights=weights,
                                    score_threshold=score_threshold, min_size=min_size)
  return select_detections(*candidates, nms_threshold=nms_threshold, detections=detections,
                           pre_nms_top_k=pre_nms_top_k)


# Candidates the first NMS pass of ``detect_batch`` looks at, per image (at least 4 per
# detection): a ``top_k`` of these costs far less than sorting all R*K candidates.
EXACT_PREFIX = 1000


def detect_batch(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    valid_size: jax.Array,
    *,
    weights: Sequence[float],
    score_threshold: float,
    nms_threshold: float,
    min_size: float,
    detections: int,
    pre_nms_top_k: Optional[int] = None,
    prefix: Optional[int] = None,
) -> Dict[str, jax.Array]:
  """:func:`detect` of each image of a batch: the same arguments with a leading batch axis
  ([B, R, K+1], ..., [B, 2]), the same results ([B, D, ...]).

  Without ``pre_nms_top_k`` the result is exact (all candidates above the threshold are
  considered) but the full sort of the R*K candidates is rarely needed: greedy NMS decides
  each candidate from the higher-scored ones alone, so NMS over the best ``prefix`` candidates
  (``top_k``, default :data:`EXACT_PREFIX` or 4 per detection) keeps the same boxes as NMS
  over all of them whenever it already keeps ``detections`` boxes, or when an image has no
  more than ``prefix`` candidates. Only if that fails for some image of the batch does a
  ``lax.cond`` run the NMS over all candidates.
  """
  candidates = jax.vmap(functools.partial(
      detection_candidates, weights=weights, score_threshold=score_threshold,
      min_size=min_size))(class_logits, box_deltas, proposals, proposal_valid, valid_size)
  select = lambda top_k: jax.vmap(functools.partial(
      select_detections, nms_threshold=nms_threshold, detections=detections,
      pre_nms_top_k=top_k))(*candidates)
  scores = candidates[3]
  prefix = max(EXACT_PREFIX, 4 * int(detections)) if prefix is None else int(prefix)
  if pre_nms_top_k is not None or prefix >= scores.shape[-1]:
    return select(pre_nms_top_k)
  first = select(prefix)
  same = ((jnp.sum(first["valid"], axis=-1) >= detections)
          | (jnp.sum(scores > -jnp.inf, axis=-1) <= prefix))
  return jax.lax.cond(jnp.all(same), lambda: first, lambda: select(None))
