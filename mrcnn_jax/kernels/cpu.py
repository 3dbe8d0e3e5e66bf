"""The CPU kernel set, the selector used where programs are built, and CPU inference helpers."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mrcnn_jax.kernels import conv as conv_lib
from mrcnn_jax.kernels.mask_predictor import MatmulMaskPredictor
from mrcnn_jax.kernels.roi_pool import pool_rois_loop
from mrcnn_jax.modeling.kernel_set import KernelSet
from mrcnn_jax.modeling.kernel_set import PLAIN
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

NAMES = ("auto", "plain", "cpu")


def init_key(key: jax.Array) -> jax.Array:
  """An ``unsafe_rbg`` key derived from ``key`` (raw uint32 data or a typed key of any impl).

  XLA:CPU compiles every threefry draw separately and slowly, and initialisation makes one draw
  per parameter array; RngBitGenerator draws compile much faster. The result is still a pure
  function of ``key``.
  """
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = jnp.asarray(key, jnp.uint32).reshape(-1)
  if words.shape[0] < 4:
    words = jnp.concatenate([words, words ^ jnp.uint32(0x9E3779B9)])
  return jax.random.wrap_key_data(words[:4], impl="unsafe_rbg")


# XLA:CPU's algorithms, same parameters and values as PLAIN (to float32 rounding).
CPU = KernelSet(conv=conv_lib.Conv, mask_predictor=MatmulMaskPredictor,
                pool_rois=pool_rois_loop, init_key=init_key,
                inference_collections=(conv_lib.TRANSFORMED_KERNELS,))
# Under a data-parallel mesh: no Winograd (its kernel gradient would be all-reduced 4x larger).
CPU_SHARDED = dataclasses.replace(CPU, conv=conv_lib.ShardedConv)


def select(name: str = "auto", *, mesh: Optional[Mesh] = None) -> KernelSet:
  """The kernel set for a program about to be built.

  Args:
    name: 'auto' (the CPU set when ``jax.default_backend()`` is 'cpu', else plain), 'plain'
      (``modeling.PLAIN``: what TPUs and GPUs run) or 'cpu'.
    mesh: the program's data-parallel mesh, if any; with more than one device the CPU set
      keeps XLA's convolution for 3x3 convs (:data:`CPU_SHARDED`).

  Returns:
    A ``KernelSet`` for ``MaskRCNN(config, kernels=...)``.
  """
  if name not in NAMES:
    raise ValueError(f"kernels must be one of {NAMES}, got {name!r}")
  if name == "auto":
    name = "cpu" if jax.default_backend() == "cpu" else "plain"
  if name == "plain":
    return PLAIN
  return CPU_SHARDED if mesh is not None and mesh.size > 1 else CPU


def prepare_inference(model: MaskRCNN, variables: Dict[str, Any], image_size: Tuple[int, int],
                      batch_size: int = 1) -> Dict[str, Any]:
  """``variables`` plus the Winograd kernel transforms ``predict`` needs, computed once.

  The CPU kernels' Winograd convolutions transform each kernel [3, 3, C, O] into
  [(m+2)^2, C, O] on every call, a pass writing 4-5x the kernel's bytes. With fixed weights
  that work can be done ahead, as inference engines pre-pack weights: this runs ``predict``'s
  layers at ``image_size`` x ``batch_size`` once with the ``conv.TRANSFORMED_KERNELS``
  collection mutable and returns the variables with it added. ``predict`` reads them instead of
  transforming again; at another size or batch, layers without a stored transform for their
  tile compute it as before, so results never depend on it (beyond float32 rounding order).
  Not for training: ``losses`` refuses these variables, since the stored transforms would not
  follow parameter updates. Where the model's kernels keep no such collection (``PLAIN``), or
  no layer takes Winograd, the variables come back without it.
  """
  collection = conv_lib.TRANSFORMED_KERNELS
  plain = {k: v for k, v in variables.items() if k != collection}
  if collection not in model.kernels.inference_collections:
    return plain
  images = jnp.zeros((batch_size,) + tuple(image_size) + (3,), jnp.uint8)

  def transforms(v):
    _, state = model.apply(v, images, method=MaskRCNN.predict, mutable=[collection])
    return state.get(collection, {})

  # Only the transforms are outputs, so XLA drops the rest of the network from this program.
  stored = jax.jit(transforms)(plain)
  if not stored:  # no layer runs Winograd here (bfloat16, small maps, ShardedConv)
    return plain
  return {**plain, collection: stored}
