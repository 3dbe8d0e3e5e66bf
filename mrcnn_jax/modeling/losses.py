"""Mask R-CNN losses, normalised exactly as torchvision normalises them.

All inputs carry a fixed number of sampled slots per image with a ``valid`` mask (padding
slots exist only when an image has too few anchors/proposals to fill the sample). Sums run
over the whole batch, as torchvision concatenates its per-image lists before reducing:

* RPN (``RegionProposalNetwork.compute_loss``): objectness BCE averaged over all sampled
  anchors; box smooth-L1 (beta 1/9) summed over positive anchors, divided by the number of
  sampled anchors.
* Fast R-CNN (``fastrcnn_loss``): cross-entropy averaged over all sampled RoIs; smooth-L1
  (beta 1/9) on the GT class's deltas summed over foreground RoIs, divided by the number of
  sampled RoIs.
* Mask (``maskrcnn_loss``): per-pixel BCE on the GT class's channel averaged over every pixel
  of every foreground RoI; exactly 0 (with zero gradient) when there is none.
* Keypoint (``keypointrcnn_loss``): softmax cross-entropy over each heatmap's ``S * S`` pixels,
  averaged over the labelled keypoints of all foreground RoIs; exactly 0 (with zero gradient)
  when there is none.

Every loss is float32 and returned on its own; the caller sums them. Targets in slots that do
not count are replaced by 0 *before* the loss: a masked-out NaN or inf target (a delta encoded
against a padded zero box) would otherwise turn the masked gradient into ``0 * nan``.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import optax


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise Huber-style smooth L1 of ``x`` as ``torch.nn.functional.smooth_l1_loss``.

  ``0.5 x^2 / beta`` where ``|x| < beta``, else ``|x| - 0.5 beta``.
  """
  ax = jnp.abs(x)
  if beta == 0:
    return ax
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _count(valid: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def rpn_losses(objectness: jax.Array, deltas: jax.Array, labels: jax.Array,
               target_deltas: jax.Array, positive: jax.Array, valid: jax.Array,
               beta: float = 1.0 / 9) -> Tuple[jax.Array, jax.Array]:
  """RPN objectness and box losses.

  Args:
    objectness: [B, S] float32 logits of the sampled anchors.
    deltas: [B, S, 4] float32 predicted deltas of the sampled anchors.
    labels: [B, S] float32 (1 object, 0 background).
    target_deltas: [B, S, 4] float32 (only read where ``positive``).
    positive: [B, S] bool.
    valid: [B, S] bool sampled slots.
    beta: smooth-L1 beta.

  Returns:
    (objectness_loss, box_loss), float32 scalars.
  """
  n = _count(valid)
  bce = optax.sigmoid_binary_cross_entropy(objectness.astype(jnp.float32), labels)
  obj_loss = jnp.sum(jnp.where(valid, bce, 0.0)) / n
  target_deltas = jnp.where(positive[..., None], target_deltas, 0.0)
  l1 = smooth_l1(deltas.astype(jnp.float32) - target_deltas, beta).sum(-1)
  box_loss = jnp.sum(jnp.where(positive, l1, 0.0)) / n
  return obj_loss, box_loss


def fast_rcnn_losses(class_logits: jax.Array, box_deltas: jax.Array, labels: jax.Array,
                     target_deltas: jax.Array, valid: jax.Array,
                     beta: float = 1.0 / 9) -> Tuple[jax.Array, jax.Array]:
  """Box-head classification and regression losses.

  Args:
    class_logits: [B, R, K+1] float32 (index 0 is background).
    box_deltas: [B, R, K+1, 4] float32 class-specific deltas.
    labels: [B, R] int32 class of each sampled RoI (0 background).
    target_deltas: [B, R, 4] float32 deltas to the matched GT box (read where ``labels > 0``).
    valid: [B, R] bool sampled slots.
    beta: smooth-L1 beta.

  Returns:
    (classification_loss, box_loss), float32 scalars.
  """
  n = _count(valid)
  ce = optax.softmax_cross_entropy_with_integer_labels(class_logits.astype(jnp.float32), labels)
  cls_loss = jnp.sum(jnp.where(valid, ce, 0.0)) / n
  fg = valid & (labels > 0)
  pred = jnp.take_along_axis(box_deltas, labels[..., None, None], axis=-2)[..., 0, :]
  target_deltas = jnp.where(fg[..., None], target_deltas, 0.0)
  l1 = smooth_l1(pred.astype(jnp.float32) - target_deltas, beta).sum(-1)
  box_loss = jnp.sum(jnp.where(fg, l1, 0.0)) / n
  return cls_loss, box_loss


def mask_loss(mask_logits: jax.Array, mask_targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Mask BCE over foreground RoIs.

  Args:
    mask_logits: [B, M, S, S] float32 logits of each RoI's GT class.
    mask_targets: [B, M, S, S] float32 in [0, 1].
    valid: [B, M] bool: the slot is a sampled foreground RoI.

  Returns:
    float32 scalar: mean BCE over all valid pixels.
  """
  s2 = mask_logits.shape[-1] * mask_logits.shape[-2]
  mask_targets = jnp.where(valid[..., None, None], mask_targets, 0.0)
  bce = optax.sigmoid_binary_cross_entropy(mask_logits.astype(jnp.float32), mask_targets)
  per_roi = bce.sum((-1, -2))
  return jnp.sum(jnp.where(valid, per_roi, 0.0)) / (_count(valid) * s2)


def keypoint_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Keypoint-head loss: each heatmap is a softmax over its pixels.

  Any leading dims: ``[N, K, S, S]`` for one image or ``[B, N, K, S, S]`` for a batch (the mean
  is over every valid entry of the batch, as torchvision concatenates the images).

  Args:
    logits: [..., K, S, S] float32 (or bfloat16) heatmap logits.
    targets: [..., K] int32 linear pixel index ``y * S + x`` of each GT keypoint (read only
      where ``valid``), e.g. from ``mrcnn_jax.ops.keypoint_targets``.
    valid: [..., K] bool: a labelled keypoint inside a sampled foreground RoI.

  Returns:
    float32 scalar: mean cross-entropy over the valid entries; 0 when none is valid.
  """
  s2 = logits.shape[-1] * logits.shape[-2]
  flat = logits.astype(jnp.float32).reshape(logits.shape[:-2] + (s2,))
  targets = jnp.where(valid, targets, 0)  # an out-of-range padding label must not be read
  ce = optax.softmax_cross_entropy_with_integer_labels(flat, targets)
  return jnp.sum(jnp.where(valid, ce, 0.0)) / _count(valid)
