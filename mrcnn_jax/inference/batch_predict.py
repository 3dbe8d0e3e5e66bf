"""Batched prediction: the jitted function evaluators are given, and static batches of images.

``make_batch_predict(model, mesh)`` is ``MaskRCNN.predict`` jitted with the batch split over the
mesh's ``'data'`` axis and the variables replicated; an evaluator feeds it global batches and
never needs to know the model or how it was trained.

``chunks`` and ``stack_padded`` turn any number of preprocessed images into batches of the
static size ``Predictor.predict_batch`` compiles for (the last one filled with padding slots).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, List, Sequence, Tuple

import jax
from jax.sharding import Mesh
import numpy as np

from mrcnn_jax import kernels
from mrcnn_jax.run import sharding as sharding_lib

PyTree = Any

__all__ = ["check_batch_size", "chunks", "make_batch_predict", "stack_padded"]


def make_batch_predict(model, mesh: Mesh) -> Callable[..., dict]:
  """``predict(variables, images, valid_size) -> detections``, jitted over ``mesh``.

  Args:
    model: the ``MaskRCNN`` module, built with this mesh (``MaskRCNN(config, mesh=mesh)``) so
      that its per-image parts (RoIAlign, proposals, detection) run shard-locally.
    mesh: the mesh whose ``'data'`` axis splits the batch.

  Returns:
    A jitted function of ``variables`` (replicated), ``images: [B, H, W, 3] uint8`` and
    ``valid_size: [B, 2] int32`` (both batch-sharded, ``B`` a multiple of the mesh's data axis)
    returning ``MaskRCNN.predict``'s dict of ``[B, ...]`` arrays, batch-sharded: ``boxes``,
    ``scores``, ``classes``, ``valid``, plus ``masks`` and/or ``keypoints`` [B, D, K, 2] and
    ``keypoint_scores`` [B, D, K] as the model's branches are enabled.
  """
  batch_sh = sharding_lib.batch_sharding(mesh)

  def predict(variables: PyTree, images: jax.Array, valid_size: jax.Array) -> dict:
    return model.apply(variables, images, valid_size, method=type(model).predict)

  return jax.jit(predict, in_shardings=(sharding_lib.replicated(mesh), batch_sh, batch_sh),
                 out_shardings=batch_sh, compiler_options=kernels.compiler_options())


def check_batch_size(batch_size: Any) -> int:
  """``batch_size`` as an int >= 1; ``ValueError`` naming the value otherwise."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  return int(batch_size)


def chunks(items: Iterable[Any], size: int) -> Iterator[List[Any]]:
  """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
  it = iter(items)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def stack_padded(images: Sequence[np.ndarray], valid_sizes: Sequence[np.ndarray],
                 batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Stacks up to ``batch_size`` preprocessed images into one static batch.

  Args:
    images: n <= batch_size arrays [H, W, 3] (one shape, the network input's).
    valid_sizes: n arrays [2] int32 (h, w) of each image before padding.
    batch_size: the static batch B.

  Returns:
    ``images`` [B, H, W, 3] and ``valid_size`` [B, 2] int32; slots n..B-1 are padding (zero
    images at full valid size), whose outputs the caller drops.
  """
  n = len(images)
  if not 0 < n <= batch_size or len(valid_sizes) != n:
    raise ValueError(f"need 1..{batch_size} images and as many valid sizes, got {n} images "
                     f"and {len(valid_sizes)} sizes")
  shape = np.shape(images[0])
  if len(shape) != 3 or any(np.shape(x) != shape for x in images):
    raise ValueError(f"images must share one [H, W, 3] shape, got "
                     f"{[np.shape(x) for x in images]}")
  out = np.zeros((batch_size,) + shape, np.asarray(images[0]).dtype)
  out[:n] = images
  valid = np.tile(np.array(shape[:2], np.int32), (batch_size, 1))
  valid[:n] = valid_sizes
  return out, valid
