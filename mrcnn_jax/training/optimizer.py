"""The optimizer and learning-rate schedule (optax), torchvision's detection recipe.

The update for a trainable parameter ``p`` with gradient ``g`` at step ``t`` is PyTorch's SGD
(dampening 0, no Nesterov)::

    g <- clip(g)                         # optional, global norm over trainable gradients
    g <- g + weight_decay * p            # only for kernels (ndim >= 2), not biases / norms
    m <- momentum * m + g
    p <- p - lr(t) * m

One difference from the references: torchvision's detection recipe and Detectron2 (by default)
decay biases too; here, as the project's spec asks, every parameter with fewer than 2 dims
(biases, norm scales and offsets) is exempt. Given the same split (torch SGD with the decay and
no-decay parameter groups that ``weight_decay_mask`` makes), the updates are PyTorch's step for
step (``tests/training/test_optimizer.py``).

Frozen parameters (frozen-BN affine, stem, stage 1; see ``modeling.trainable_mask``) get a zero
update and carry no optimizer state at all (``optax.multi_transform`` with ``set_to_zero``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any
MaskOrFn = Union[PyTree, Callable[[PyTree], PyTree]]

_TRAINABLE = "trainable"
_FROZEN = "frozen"


def peak_learning_rate(train_config: ml_collections.ConfigDict) -> float:
  """The post-warm-up rate: ``base_learning_rate`` scaled linearly to ``batch_size``."""
  return (train_config.base_learning_rate * train_config.batch_size /
          train_config.base_batch_size)


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then step decay (torchvision's LinearLR followed by MultiStepLR).

  ``lr(t) = peak * w(t) * decay_factor ** #{s in decay_steps : t >= s}`` with
  ``w(t) = warmup_factor + (1 - warmup_factor) * t / warmup_steps`` for ``t < warmup_steps`` and
  1 afterwards. ``t`` counts the updates already applied, so the first update uses ``lr(0)``.

  Args:
    train_config: the ``config.train`` section.

  Returns:
    A schedule: int step (traced or not) -> float32 scalar learning rate.
  """
  peak = peak_learning_rate(train_config)
  warmup_steps = int(train_config.warmup_steps)
  warmup_factor = float(train_config.warmup_factor)
  boundaries = jnp.asarray(sorted(train_config.decay_steps), jnp.int32).reshape(-1)
  decay_factor = float(train_config.decay_factor)

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    if warmup_steps > 0:
      alpha = jnp.minimum(step.astype(jnp.float32) / warmup_steps, 1.0)
      warm = warmup_factor + (1.0 - warmup_factor) * alpha
    else:
      warm = jnp.float32(1.0)
    num_decays = jnp.sum(step >= boundaries).astype(jnp.float32)
    return (peak * warm * decay_factor**num_decays).astype(jnp.float32)

  return schedule


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for parameters that get weight decay: conv / dense kernels (ndim >= 2).

  Biases and normalisation scales/offsets are all 1-D, so the rank alone separates them; this
  holds for frozen BN, GroupNorm and trainable BN alike, whatever the modules are named.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _labels(trainable_mask: Optional[MaskOrFn]) -> Callable[[PyTree], PyTree]:
  """params -> pytree of 'trainable' / 'frozen' labels, for ``optax.multi_transform``."""

  def labels(params):
    if trainable_mask is None:
      mask = jax.tree.map(lambda _: True, params)
    elif callable(trainable_mask):
      mask = trainable_mask(params)
    else:
      mask = trainable_mask
    return jax.tree.map(lambda m: _TRAINABLE if m else _FROZEN, mask)

  return labels


def make_optimizer(train_config: ml_collections.ConfigDict, *,
                   trainable_mask: Optional[MaskOrFn] = None) -> optax.GradientTransformation:
  """Builds SGD-momentum with masked weight decay, the schedule, clipping and frozen parameters.

  Args:
    train_config: the ``config.train`` section (see ``training/config.py``).
    trainable_mask: a pytree of bool with the params' structure, or a function params -> such a
      pytree; False marks frozen parameters, which get a zero update and no optimizer state.
      ``None`` trains everything.

  Returns:
    An ``optax.GradientTransformation``; ``init(params)`` and ``update(grads, state, params)``
    (``params`` is required, for weight decay).
  """
  parts = []
  if train_config.grad_clip_norm and train_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip_norm)))
  if train_config.weight_decay:
    parts.append(optax.add_decayed_weights(float(train_config.weight_decay),
                                           mask=weight_decay_mask))
  parts.append(optax.sgd(learning_rate_schedule(train_config),
                         momentum=float(train_config.momentum) or None))
  trainable = optax.chain(*parts)
  return optax.multi_transform(
      {_TRAINABLE: trainable, _FROZEN: optax.set_to_zero()}, _labels(trainable_mask))
