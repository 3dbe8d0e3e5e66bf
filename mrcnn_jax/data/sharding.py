"""Host batches -> global ``jax.Array`` s sharded over the mesh's ``'data'`` axis.

Each of ``jax.process_count()`` hosts reads its own ``global / process_count`` examples per step
(:mod:`mrcnn_jax.data.pipeline`); :func:`make_global_batch` stitches them into one global array
per field whose leading (batch) dimension is split over the ``'data'`` axis and replicated over
any other mesh axis. No data moves between hosts.
"""

from __future__ import annotations

from typing import Dict, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
  """The sharding of every batch field: dim 0 over ``axis``, the rest replicated."""
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has axes {mesh.axis_names}, no {axis!r} axis to shard the batch over")
  return NamedSharding(mesh, PartitionSpec(axis))


def make_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                      axis: str = "data") -> Dict[str, jax.Array]:
  """Host-local batch (dict of [B_host, ...] arrays) -> dict of global [B_host * hosts, ...] arrays.

  Args:
    host_batch: this host's batch, e.g. from ``build_train_dataset(config)``.
    mesh: the device mesh; its ``axis`` must span every device of every host that holds data.
    axis: the mesh axis the batch dimension is sharded over.

  Returns:
    The same keys, as ``jax.Array`` s of global batch size sharded with :func:`batch_sharding`.
  """
  sharding = batch_sharding(mesh, axis)
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"batch field {key!r} is a scalar; every field needs a batch dimension")
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
