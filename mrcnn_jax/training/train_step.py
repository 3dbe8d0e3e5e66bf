"""The pure train step and its jit over the data-parallel mesh.

``train_step`` is written for one device holding the global batch; ``make_train_step`` jits it
with explicit shardings (batch split on ``'data'``, state replicated) and donates the state, so
XLA inserts the gradient all-reduce and updates the parameters in place. Everything stays on
device: metrics are returned as arrays for the host to fetch every N steps.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import optimizer as optimizer_lib
from mrcnn_jax.training import train_state as train_state_lib

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[train_state_lib.TrainState, Batch],
                  tuple[train_state_lib.TrainState, Metrics]]

LOSS_KEYS = ("rpn_objectness", "rpn_box", "roi_class", "roi_box", "roi_mask")


def train_step(state: train_state_lib.TrainState, batch: Batch, *, model,
               optimizer: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> tuple[train_state_lib.TrainState, Metrics]:
  """One SGD update on the global batch.

  Args:
    state: the current ``TrainState``.
    batch: the batch dict of ``notes/batch_api``: ``image: [B, H, W, 3] uint8``,
      ``gt_boxes: [B, G, 4] float32 xyxy pixels``, ``gt_classes: [B, G] int32``,
      ``gt_masks: [B, G, S, S] uint8``, ``gt_valid: [B, G] bool``, ...
    model: the Flax module with a ``losses(batch) -> (losses, stats)`` method that uses the
      ``'sampling'`` rng stream.
    optimizer: the optax transformation (``default_optimizer(config)``).
    config: the full config; reads ``config.model`` (norm) and ``config.train`` (schedule).

  Returns:
    ``(new_state, metrics)``; metrics are float32 scalars: each loss, ``total_loss``,
    ``learning_rate`` (the rate this update used), ``grad_norm`` (global norm of the
    gradients before clipping) and the model's stats (``rpn_num_fg``, ``roi_num_fg``, ...).
  """
  # Folding the step in (rather than splitting and carrying a new key) makes the samples of
  # step t a function of (seed, t) alone, so resuming from a checkpoint reproduces them.
  rng = jax.random.fold_in(state.rng, state.step)
  mutable = ["batch_stats"] if train_state_lib.uses_batch_stats(config.model) else False

  def loss_fn(params):
    variables = dict(state.variables(), params=params)
    out = model.apply(variables, batch, method=type(model).losses, rngs={"sampling": rng},
                      mutable=mutable)
    if mutable:
      (losses, stats), new_vars = out
      new_batch_stats = new_vars["batch_stats"]
    else:
      losses, stats = out
      new_batch_stats = state.batch_stats
    losses = {k: jnp.asarray(v, jnp.float32) for k, v in losses.items()}
    total = sum(losses.values())
    return total, (losses, stats, new_batch_stats)

  (total, (losses, stats, new_batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  schedule = optimizer_lib.learning_rate_schedule(config.train)
  metrics = dict(losses)
  metrics["total_loss"] = total
  metrics["learning_rate"] = schedule(state.step)
  metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
  metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in stats.items()})
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=new_batch_stats)
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, model, mesh: Mesh,
                    state: train_state_lib.TrainState, *,
                    optimizer: Optional[optax.GradientTransformation] = None) -> StepFn:
  """Jits :func:`train_step` over ``mesh``: batch split on the data axis, state donated.

  Args:
    config: the full config.
    model: the Flax module.
    mesh: the training mesh; the global batch size must be a multiple of its size.
    state: the state (or its ``jax.eval_shape``), used only for its structure.
    optimizer: must be the one the state was created with; defaults to
      ``default_optimizer(config)``.

  Returns:
    ``step_fn(state, batch) -> (state, metrics)``; compiled once per batch shape. The input
    state is donated: do not use it after the call.
  """
  optimizer = train_state_lib.default_optimizer(config) if optimizer is None else optimizer
  # The model carries its mesh (``MaskRCNN(..., mesh=mesh)``): its per-image parts run
  # shard-locally; everything else is partitioned by XLA from the shardings.
  def step(state, batch):
    return train_step(state, batch, model=model, optimizer=optimizer, config=config)

  state_sh = train_state_lib.state_shardings(state, mesh)
  replicated = sharding_lib.replicated(mesh)
  # A single sharding is a prefix of the batch dict: every leaf is split on its leading dim.
  return jax.jit(step,
                 in_shardings=(state_sh, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_sh, replicated),
                 donate_argnums=0)
