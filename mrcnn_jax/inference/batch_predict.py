"""Batched prediction over a mesh: the jitted function evaluators are given.

``make_batch_predict(model, mesh)`` is ``MaskRCNN.predict`` jitted with the batch split over the
mesh's ``'data'`` axis and the variables replicated; an evaluator feeds it global batches and
never needs to know the model or how it was trained.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh

from mrcnn_jax import kernels
from mrcnn_jax.run import sharding as sharding_lib

PyTree = Any

__all__ = ["make_batch_predict"]


def make_batch_predict(model, mesh: Mesh) -> Callable[..., dict]:
  """``predict(variables, images, valid_size) -> detections``, jitted over ``mesh``.

  Args:
    model: the ``MaskRCNN`` module, built with this mesh (``MaskRCNN(config, mesh=mesh)``) so
      that its per-image parts (RoIAlign, proposals, detection) run shard-locally.
    mesh: the mesh whose ``'data'`` axis splits the batch.

  Returns:
    A jitted function of ``variables`` (replicated), ``images: [B, H, W, 3] uint8`` and
    ``valid_size: [B, 2] int32`` (both batch-sharded, ``B`` a multiple of the mesh's data axis)
    returning ``MaskRCNN.predict``'s dict of ``[B, ...]`` arrays, batch-sharded.
  """
  batch_sh = sharding_lib.batch_sharding(mesh)

  def predict(variables: PyTree, images: jax.Array, valid_size: jax.Array) -> dict:
    return model.apply(variables, images, valid_size, method=type(model).predict)

  return jax.jit(predict, in_shardings=(sharding_lib.replicated(mesh), batch_sh, batch_sh),
                 out_shardings=batch_sh, compiler_options=kernels.compiler_options())
