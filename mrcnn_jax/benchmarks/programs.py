"""The programs the benchmarks compile: the model, its ``predict`` and its train step.

Every call the benchmarks make into ``modeling`` and ``training`` to build a model, prepare
inference variables, jit ``predict`` or set up a sharded train step goes through here, so the
benchmarks build them exactly as ``inference.Predictor`` and the trainer do, in one place.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax import run
from mrcnn_jax import training


def build_model(config: ml_collections.ConfigDict, mesh: Optional[jax.sharding.Mesh] = None,
                kernel_set: Optional[modeling.KernelSet] = None) -> modeling.MaskRCNN:
  """The Mask R-CNN of ``config.model`` as the trainer builds it: ``config.kernels`` selected
  for ``mesh`` (or ``kernel_set``), per-image parts shard-local over ``mesh``."""
  if kernel_set is None:
    kernel_set = kernels.select(config.kernels, mesh=mesh)
  return modeling.MaskRCNN(config.model, kernels=kernel_set, mesh=mesh)


def random_variables(model: modeling.MaskRCNN, image_size: Tuple[int, int]) -> Dict[str, Any]:
  """``model``'s variables from key 0, initialised under ``jax.jit``."""
  return jax.jit(lambda k: modeling.init_variables(model, k, image_size))(jax.random.PRNGKey(0))


def prepare_inference(model: modeling.MaskRCNN, variables: Dict[str, Any],
                      image_size: Tuple[int, int], batch: int = 1) -> Dict[str, Any]:
  """``variables`` with what ``predict`` can compute ahead at this input size (as the
  library's inference path does)."""
  return kernels.prepare_inference(model, variables, image_size, batch)


def predict_function(model: modeling.MaskRCNN, library: bool = True) -> Callable:
  """Jitted ``predict(variables, images [B, H, W, 3] uint8, valid_size [B, 2] int32)``.

  With ``library``, compiled as ``inference.Predictor`` compiles it (``kernels.jit_predict``
  and its compiler options); without, a plain ``jax.jit`` with XLA's default options.
  """
  if library:
    return kernels.jit_predict(model)
  return jax.jit(lambda v, im, vs: model.apply(v, im, vs, method=type(model).predict))


def random_predict(config: ml_collections.ConfigDict, batch: int
                   ) -> Tuple[Callable, Tuple[Dict[str, Any], jax.Array, jax.Array]]:
  """``(predict, (variables, images, valid_size))`` at ``config.data.image_size``: the library's
  jitted ``predict`` with random, prepared variables and ``batch`` random uint8 images on the
  default device (each image the whole input)."""
  h, w = config.data.image_size
  model = build_model(config)
  variables = prepare_inference(model, random_variables(model, (h, w)), (h, w), batch)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8))
  valid_size = jax.device_put(np.tile(np.asarray([h, w], np.int32), (batch, 1)))
  return predict_function(model), (variables, images, valid_size)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """The trainer's data-parallel mesh over ``devices`` (default: all)."""
  return run.make_mesh(devices)


def train_state(config: ml_collections.ConfigDict, model: modeling.MaskRCNN,
                mesh: jax.sharding.Mesh) -> Any:
  """The trainer's train state from key 0, created sharded over ``mesh``."""
  return training.create_train_state(config, model, jax.random.PRNGKey(0), mesh)


def train_step(config: ml_collections.ConfigDict, model: modeling.MaskRCNN,
               mesh: jax.sharding.Mesh, state: Any) -> Callable:
  """The trainer's jitted ``step(state, batch) -> (state, metrics)`` (``state`` donated)."""
  return training.make_train_step(config, model, mesh, state)


def shard_batch(batch: Dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> Dict[str, jax.Array]:
  """A host batch as global arrays split over ``mesh``'s data axis."""
  return run.make_global_batch(batch, mesh)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The sharding of every batch array: split along the batch dimension."""
  return run.batch_sharding(mesh)
