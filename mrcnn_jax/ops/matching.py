"""Assigns each prediction (anchor or proposal) a ground-truth box, torchvision ``Matcher``-style.

Ground truth is padded to a fixed ``G`` rows with a validity mask, so the matcher takes the mask
and treats padded rows as absent: they never win a prediction and never claim one through the
low-quality rule. Everything is a reduction over a static [G, P] matrix, so it jits and vmaps.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mrcnn_jax.ops._checks import check_shape

ArrayLike = jax.typing.ArrayLike

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match_boxes(
    iou: ArrayLike,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool,
    gt_valid: Optional[ArrayLike] = None,
) -> jax.Array:
  """Best ground truth for each prediction, or a negative code.

  Semantics of ``torchvision.models.detection._utils.Matcher``: prediction ``p`` takes the
  ground truth of highest quality (the first one on ties); it keeps it if that quality is
  ``>= high_threshold``, else gets ``-2`` (``BETWEEN_THRESHOLDS``) if it is ``>= low_threshold``,
  else ``-1`` (``BELOW_LOW_THRESHOLD``). With ``allow_low_quality_matches`` (the RPN's rule from
  Faster R-CNN), every prediction that attains some ground truth's highest quality (ties
  included) keeps its best ground truth whatever its quality.

  Unlike torchvision, an image without ground truth is fine: with every row invalid all
  predictions get ``-1``.

  Args:
    iou: [G, P] float32 quality matrix (ground truth x predictions), usually ``box_iou``.
    high_threshold: qualities ``>=`` this are matches.
    low_threshold: qualities in ``[low, high)`` are ``-2``, below are ``-1``.
    allow_low_quality_matches: static bool, see above.
    gt_valid: [G] bool, False for padding rows; None means all rows are valid.

  Returns:
    [P] int32: a ground-truth index in ``[0, G)``, ``-1`` or ``-2``.
  """
  check_shape("iou", iou, 2)
  if low_threshold > high_threshold:
    raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
  iou = jnp.asarray(iou, jnp.float32)
  num_gt = iou.shape[0]
  if gt_valid is None:
    gt_valid = jnp.ones((num_gt,), bool)
  else:
    check_shape("gt_valid", gt_valid, 1, (num_gt,))
    gt_valid = jnp.asarray(gt_valid, bool)
  if num_gt == 0:
    return jnp.full((iou.shape[1],), BELOW_LOW_THRESHOLD, jnp.int32)

  # Padded rows sit below every real quality, so they can only "win" when no row is valid,
  # and then the -inf value falls below any low threshold.
  masked = jnp.where(gt_valid[:, None], iou, -jnp.inf)  # [G, P]
  best_gt = jnp.argmax(masked, axis=0).astype(jnp.int32)  # [P], first max on ties
  best_val = jnp.max(masked, axis=0)  # [P]

  matches = jnp.where(best_val >= high_threshold, best_gt, BETWEEN_THRESHOLDS)
  matches = jnp.where(best_val < low_threshold, BELOW_LOW_THRESHOLD, matches)

  if allow_low_quality_matches:
    best_per_gt = jnp.max(masked, axis=1, keepdims=True)  # [G, 1]
    is_best = (masked == best_per_gt) & gt_valid[:, None]  # [G, P]
    matches = jnp.where(jnp.any(is_best, axis=0), best_gt, matches)
  return matches.astype(jnp.int32)
