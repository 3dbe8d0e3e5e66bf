"""Fixed-size balanced sampling of positives and negatives (RPN anchors, RoI-head proposals).

torchvision's ``BalancedPositiveNegativeSampler`` draws ``randperm`` subsets of variable size.
Here the same counts are drawn with static shapes: every candidate gets a random priority, the
``k`` highest priorities among positives (and among negatives) are taken with ``lax.top_k``,
and the result is a fixed ``num_samples`` slots with a validity mask. Taking the top ``k`` of
i.i.d. uniform priorities selects every ``k``-subset with equal probability, as a random
permutation does.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops._checks import check_shape

ArrayLike = jax.typing.ArrayLike


def _top_indices(mask: jax.Array, priority: jax.Array, k: int) -> jax.Array:
  """Indices of the ``k`` highest priorities among ``mask``; [k] int32, masked ones first."""
  if k == 0:
    return jnp.zeros((0,), jnp.int32)
  # Priorities lie in [0, 1), so -1 puts every unmasked candidate after all masked ones.
  _, idx = jax.lax.top_k(jnp.where(mask, priority, -1.0), k)
  return idx.astype(jnp.int32)


def sample_balanced(
    labels: ArrayLike,
    num_samples: int,
    positive_fraction: float,
    key: jax.Array,
) -> Tuple[jax.Array, jax.Array]:
  """Draws up to ``num_samples`` candidates, at most ``positive_fraction`` of them positive.

  Counts follow torchvision's ``BalancedPositiveNegativeSampler``:
  ``num_pos = min(int(num_samples * positive_fraction), #positives)`` and
  ``num_neg = min(num_samples - num_pos, #negatives)``; both subsets are uniformly random.

  Args:
    labels: [N] int32: ``>= 1`` positive, ``0`` negative, ``< 0`` ignored (the usual encoding
      is 1 / 0 / -1).
    num_samples: static int, the number of output slots (e.g. 256 anchors, 512 RoIs).
    positive_fraction: static float in [0, 1].
    key: a ``jax.random`` key; the same key gives the same selection.

  Returns:
    indices: [num_samples] int32 indices into ``labels``: the ``num_pos`` sampled positives
      first, then the ``num_neg`` negatives, then padding slots holding index 0 (always a safe
      gather index; mask them with ``valid``).
    valid: [num_samples] bool, True for the ``num_pos + num_neg`` sampled slots.
  """
  check_shape("labels", labels, 1)
  num_samples = int(num_samples)
  if num_samples < 0:
    raise ValueError(f"num_samples must be >= 0, got {num_samples}")
  if not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
  labels = jnp.asarray(labels, jnp.int32)
  n = labels.shape[0]
  positive = labels >= 1
  negative = labels == 0

  max_pos = int(num_samples * positive_fraction)  # torchvision truncates the same way
  num_pos = jnp.minimum(max_pos, jnp.sum(positive, dtype=jnp.int32))
  num_neg = jnp.minimum(num_samples - num_pos, jnp.sum(negative, dtype=jnp.int32))

  # One priority per candidate serves both groups: they are disjoint.
  priority = jax.random.uniform(key, (n,), jnp.float32)
  pos_idx = _top_indices(positive, priority, min(max_pos, n))
  neg_idx = _top_indices(negative, priority, min(num_samples, n))

  slot = jnp.arange(num_samples, dtype=jnp.int32)
  is_pos = slot < num_pos
  valid = slot < num_pos + num_neg
  out = jnp.zeros((num_samples,), jnp.int32)
  if pos_idx.shape[0]:
    out = jnp.where(is_pos, pos_idx[jnp.clip(slot, 0, pos_idx.shape[0] - 1)], out)
  if neg_idx.shape[0]:
    neg_slot = jnp.clip(slot - num_pos, 0, neg_idx.shape[0] - 1)
    out = jnp.where(~is_pos & valid, neg_idx[neg_slot], out)
  return out, valid
