"""The compiled data-parallel train step communicates its gradients and nothing else.

XLA's partitioner would all-gather the feature maps for RoIAlign and the scores for top_k if
the model's per-image parts were left to it (modeling/batch_parallel.py); those bytes grow with
the image size and the device count. Here the tiny model's step is compiled over 8 devices and
its HLO read: one all-reduce of about the trainable gradients, no all-gather. The same step
compiled with the shard-local parts switched off shows the all-gathers, so the check can fail.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.benchmarks import collectives
from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import train_state as train_state_lib
from mrcnn_jax.training import train_step as train_step_lib
from tests.training import test_train_step_maskrcnn as tiny

pytestmark = pytest.mark.slow


def _compiled_stats(config, mesh, shard_local=True):
  model = modeling.MaskRCNN(config.model, kernels=kernels.select(config.kernels, mesh=mesh),
                            mesh=mesh if shard_local else None)
  state = jax.eval_shape(lambda k: train_state_lib.create_train_state(config, model, k, mesh),
                         jax.random.PRNGKey(0))
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
      train_state_lib.state_shardings(state, mesh))
  batch = tiny._batches(config)[0]
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.batch_sharding(mesh))
           for k, v in batch.items()}
  step_fn = train_step_lib.make_train_step(config, model, mesh, state)
  hlo = step_fn.lower(state, batch).compile().as_text()
  trainable = sum(int(np.prod(p.shape)) for p, t in zip(
      jax.tree.leaves(state.params),
      jax.tree.leaves(modeling.trainable_mask(state.params, config.model))) if t)
  return collectives.collective_stats(hlo), trainable * 4


def test_data_parallel_step_moves_only_gradients():
  config = tiny._config()
  mesh = sharding_lib.make_mesh(jax.devices()[:8])
  stats, gradient_bytes = _compiled_stats(config, mesh)
  assert stats["all-gather"]["bytes"] == 0, stats
  assert stats["all-to-all"]["bytes"] == 0, stats
  assert stats["collective-permute"]["bytes"] <= 1024, stats  # PRNG key words only
  # The all-reduce carries the float32 gradients (plus a few scalar metrics). XLA:CPU reduces
  # the shared RPN head's gradient once per FPN level before summing the five partials (12%
  # extra on this tiny model, 5% on R50-FPN); the bound allows that, not a second copy.
  assert gradient_bytes <= stats["all-reduce"]["bytes"] <= 1.2 * gradient_bytes + 1024, (
      stats, gradient_bytes)

  # Without the shard-local per-image parts, the partitioner gathers activations.
  default, _ = _compiled_stats(config, mesh, shard_local=False)
  assert default["all-gather"]["bytes"] > 0.5 * gradient_bytes, default
