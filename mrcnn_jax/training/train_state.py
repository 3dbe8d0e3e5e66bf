"""The training state and its sharded creation.

``TrainState`` is a plain pytree (no functions inside), so it can be donated to the jitted step,
checkpointed with orbax and given shardings leaf by leaf. The optimizer is not part of it: it is
a pure function of the config (:func:`default_optimizer`) bound into the step.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mrcnn_jax import modeling
from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import optimizer as optimizer_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step.

  Attributes:
    step: int32 scalar, the number of updates applied so far.
    params: the model's ``'params'`` collection, float32.
    opt_state: the optax state (momentum buffers for trainable parameters only).
    batch_stats: the ``'batch_stats'`` collection with trainable BatchNorm, else ``{}``.
    rng: uint32 [2] raw PRNG key; the step folds ``step`` into it, so a resumed run draws the
      same samples as an uninterrupted one.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  batch_stats: PyTree
  rng: jax.Array

  def variables(self) -> dict[str, PyTree]:
    """The Flax variables dict for ``model.apply``."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def uses_batch_stats(model_config: ml_collections.ConfigDict) -> bool:
  """True when the model has trainable BatchNorm, whose running stats are a mutable collection."""
  return model_config.get("norm", "frozen_bn") == "bn"


def default_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer for the full config: ``make_optimizer`` with the model's frozen parameters."""
  mask_fn = functools.partial(modeling.trainable_mask, config=config.model)
  return optimizer_lib.make_optimizer(config.train, trainable_mask=mask_fn)


def _default_init(model, key, image_size):
  return modeling.init_variables(model, key, image_size)


def create_train_state(config: ml_collections.ConfigDict, model, key: jax.Array, mesh: Mesh, *,
                       optimizer: Optional[optax.GradientTransformation] = None,
                       init_fn=None) -> TrainState:
  """Creates the initial state directly with its shardings: no full copy is born on device 0.

  The initialiser is traced once with ``jax.eval_shape`` to learn the state's structure, then
  run under ``jax.jit(out_shardings=...)`` so every leaf is created in place, replicated over
  ``mesh``.

  Args:
    config: the full config (``model``, ``data``, ``train`` sections); the image size used for
      shape inference is ``config.data.image_size``.
    model: the Flax module (``MaskRCNN(config.model)``).
    key: PRNG key (raw uint32 [2] or typed); split into the parameter key and the state's key.
    mesh: the training mesh (see ``sharding.make_mesh``).
    optimizer: defaults to :func:`default_optimizer` ``(config)``; pass the one the step uses.
    init_fn: ``(model, key, image_size) -> variables``; defaults to ``modeling.init_variables``.

  Returns:
    A ``TrainState`` at step 0 whose leaves are replicated over ``mesh``.
  """
  optimizer = default_optimizer(config) if optimizer is None else optimizer
  init_fn = _default_init if init_fn is None else init_fn
  image_size = tuple(config.data.image_size)
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)

  def init(key):
    params_key, state_key = jax.random.split(key)
    variables = init_fn(model, params_key, image_size)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        batch_stats=variables.get("batch_stats", {}),
        rng=state_key)

  abstract = jax.eval_shape(init, key)
  shardings = sharding_lib.replicated_shardings(abstract, mesh)
  return jax.jit(init, out_shardings=shardings)(key)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """The shardings of a state (or an abstract one from ``jax.eval_shape``): all replicated."""
  return sharding_lib.replicated_shardings(state, mesh)
