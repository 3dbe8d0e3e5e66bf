"""Region Proposal Network (Ren et al., "Faster R-CNN", 2015) over the FPN levels.

Three pieces, as torchvision's ``RegionProposalNetwork``:

* :class:`RPNHead`: a shared 3x3 conv + ReLU, then per anchor one objectness logit and four
  box deltas, on every level (P2..P6).
* :func:`generate_proposals` (one image; vmap it): per-level top-k by objectness, decode,
  clip to the valid (unpadded) image, drop tiny boxes, NMS per level, keep the best
  ``post_nms_top_k`` over all levels. Fixed-size output with a ``valid`` mask.
* :func:`rpn_targets` (one image): match anchors to GT (IoU 0.7 / 0.3, low-quality matches
  allowed), sample 256 anchors with at most half positive, and their regression targets.

Anchor order everywhere is torchvision's: level-major, then position (row-major), then anchor.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.modeling import layers
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.matching import match_boxes
from mrcnn_jax.ops.nms import batched_nms
from mrcnn_jax.ops.sampling import sample_balanced

# torchvision's RPNHead init: normal(std=0.01), bias 0, for all three convs.
rpn_init = nn.initializers.normal(stddev=0.01)


class RPNHead(nn.Module):
  """Objectness and box deltas per anchor, weights shared over levels.

  Attributes:
    num_anchors: anchors per location ``A`` (3).
    dtype: activation dtype; the outputs are float32.
    conv: the conv layer class (``KernelSet.conv``).
  """

  num_anchors: int
  dtype: Any = jnp.float32
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array]) -> Tuple[jax.Array, jax.Array]:
    """feats: [P2..P6], each [B, Hl, Wl, C].

    Returns:
      objectness: [B, N] float32 logits, N = sum_l Hl * Wl * A, torchvision's anchor order.
      deltas: [B, N, 4] float32 ``(dx, dy, dw, dh)`` (torchvision's ``bbox_pred`` channel
        ``4 * a + j`` is anchor ``a``'s coordinate ``j``, which this reshape preserves).
    """
    c = feats[0].shape[-1]
    a = self.num_anchors
    kw = dict(kernel_init=rpn_init, bias_init=nn.initializers.zeros, dtype=self.dtype,
              param_dtype=jnp.float32)
    conv = self.conv(c, (3, 3), padding=((1, 1), (1, 1)), name="conv", **kw)
    cls = self.conv(a, (1, 1), name="cls_logits", **kw)
    bbox = self.conv(4 * a, (1, 1), name="bbox_pred", **kw)
    return predict_levels(feats, lambda f: nn.relu(conv(f)), cls, bbox, a)


def predict_levels(feats: Sequence[jax.Array], trunk, cls, bbox,
                   num_anchors: int) -> Tuple[jax.Array, jax.Array]:
  """The RPN heads' shared output layout: per level ``trunk``, then ``cls`` / ``bbox``.

  Returns ``objectness`` [B, N] and ``deltas`` [B, N, 4] float32 over the levels in order,
  N = sum_l Hl * Wl * A (torchvision's anchor order: row-major pixels, then anchors).
  """
  a = num_anchors
  logits, deltas = [], []
  for f in feats:
    t = trunk(f)
    b, h, w = f.shape[:3]
    logits.append(cls(t).astype(jnp.float32).reshape(b, h * w * a))
    deltas.append(bbox(t).astype(jnp.float32).reshape(b, h * w * a, 4))
  return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)


def level_sizes(anchors: Sequence[np.ndarray]) -> Tuple[int, ...]:
  """Anchors per level, from the per-level list ``generate_anchors`` returns."""
  return tuple(int(a.shape[0]) for a in anchors)


def generate_proposals(
    objectness: jax.Array,
    deltas: jax.Array,
    anchors: jax.Array,
    valid_size: jax.Array,
    *,
    level_sizes: Sequence[int],
    pre_nms_top_k: int,
    post_nms_top_k: int,
    nms_threshold: float,
    min_size: float,
    score_threshold: float = 0.0,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Proposals of one image, as torchvision's ``RegionProposalNetwork.filter_proposals``.

  Args:
    objectness: [N] float32 logits.
    deltas: [N, 4] float32.
    anchors: [N, 4] float32, xyxy pixels.
    valid_size: [2] (h, w) of the unpadded image; proposals are clipped to it.
    level_sizes: static anchors per level (sums to N).
    pre_nms_top_k: per level, the best-scored anchors that go on (fewer if a level has fewer).
    post_nms_top_k: proposals kept per image over all levels (the output length).
    nms_threshold: IoU threshold of the per-level NMS.
    min_size: boxes narrower or shorter than this (after clipping) are dropped.
    score_threshold: proposals with sigmoid(objectness) below this are dropped.
    weights: box-coder weights.

  Returns:
    boxes: [post_nms_top_k, 4] float32 xyxy, best first; padding rows are zero.
    scores: [post_nms_top_k] float32 sigmoid objectness; padding 0.
    valid: [post_nms_top_k] bool.
  """
  # Proposals are inputs to the second stage, not functions of the RPN's weights: torchvision
  # detaches them, so no gradient flows through decoding or the selection.
  objectness = jax.lax.stop_gradient(objectness)
  deltas = jax.lax.stop_gradient(deltas)
  idx, lvl = [], []
  start = 0
  for level, n in enumerate(level_sizes):
    k = min(int(pre_nms_top_k), n)
    _, top = jax.lax.top_k(objectness[start:start + n], k)
    idx.append(top + start)
    lvl.append(np.full((k,), level, np.int32))
    start += n
  idx = jnp.concatenate(idx)
  lvl = jnp.asarray(np.concatenate(lvl))
  boxes = box_ops.decode_boxes(deltas[idx], anchors[idx], weights)
  boxes = box_ops.clip_boxes(boxes, valid_size)
  prob = jax.nn.sigmoid(objectness[idx])
  keep = box_ops.small_box_mask(boxes, min_size) & (prob >= score_threshold)
  kept = batched_nms(boxes, jnp.where(keep, prob, -jnp.inf), lvl, nms_threshold,
                     int(post_nms_top_k))
  valid = kept >= 0
  safe = jnp.maximum(kept, 0)
  out_boxes = jnp.where(valid[:, None], boxes[safe], 0.0)
  out_scores = jnp.where(valid, prob[safe], 0.0)
  return out_boxes, out_scores, valid


def rpn_targets(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    key: jax.Array,
    *,
    fg_iou_threshold: float,
    bg_iou_threshold: float,
    batch_size_per_image: int,
    positive_fraction: float,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Dict[str, jax.Array]:
  """Sampled anchors of one image and their targets (torchvision ``assign_targets_to_anchors``
  followed by the ``fg_bg_sampler``).

  Args:
    anchors: [N, 4] float32, xyxy pixels.
    gt_boxes: [G, 4] float32, xyxy pixels.
    gt_valid: [G] bool.
    key: PRNG key for the sampler.
    fg_iou_threshold, bg_iou_threshold: Matcher thresholds (0.7, 0.3), low-quality matches on.
    batch_size_per_image: S, sampled anchors (256).
    positive_fraction: at most this fraction of S is positive (0.5).
    weights: box-coder weights.

  Returns:
    dict with ``index`` [S] int32 anchor indices, ``valid`` [S] bool (sampled slot is real),
    ``label`` [S] float32 (1 object, 0 background; 0 in padding slots), ``positive`` [S]
    bool and ``target`` [S, 4] float32 deltas (0 where not positive).
  """
  iou = box_ops.box_iou(gt_boxes, anchors)  # [G, N]
  matched = match_boxes(iou, fg_iou_threshold, bg_iou_threshold, True, gt_valid)
  labels = jnp.where(matched >= 0, 1, jnp.where(matched == -1, 0, -1)).astype(jnp.int32)
  index, valid = sample_balanced(labels, int(batch_size_per_image), positive_fraction, key)
  positive = valid & (labels[index] == 1)
  matched_boxes = gt_boxes[jnp.maximum(matched[index], 0)]
  target = box_ops.encode_boxes(matched_boxes, anchors[index], weights)
  # Non-positive slots may hold -inf/NaN (a padded zero GT box): zero them, they carry no loss.
  target = jnp.where(positive[:, None], target, 0.0)
  return dict(index=index, valid=valid, label=positive.astype(jnp.float32),
              positive=positive, target=target)


def concat_anchors(anchors: List[np.ndarray]) -> np.ndarray:
  """[N, 4] float32: the per-level anchors of ``generate_anchors`` in one array."""
  return np.concatenate(anchors, axis=0).astype(np.float32)
