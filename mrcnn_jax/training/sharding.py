"""The device mesh and shardings for data-parallel training.

One mesh axis, ``'data'``, spans every device of every host. Batches are split along their
leading (batch) dimension over that axis; parameters, optimizer state and metrics are
replicated. XLA (GSPMD) inserts the gradient all-reduce, so the step is written as if for one
device holding the global batch.

Multi-host: call :func:`mrcnn_jax.training.distributed.initialize` first (it runs
``jax.distributed.initialize()``); each host then feeds its own slice of the global batch to
:func:`shard_batch`, which assembles the global ``jax.Array``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, *,
              axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh named ``axis_name`` over ``devices`` (default: all devices of all hosts).

  Args:
    devices: the devices to use, in mesh order; ``None`` takes ``jax.devices()``.
    axis_name: the mesh axis name.

  Returns:
    A ``jax.sharding.Mesh`` of shape ``[len(devices)]``.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device")
  return Mesh(np.asarray(devices, dtype=object).reshape(-1), (axis_name,))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that puts a full copy of an array on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension over every mesh axis; other dims unsplit."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises ``ValueError`` unless the global batch divides evenly over the mesh devices."""
  if global_batch_size % mesh.size:
    raise ValueError(f"global batch size {global_batch_size} must be a multiple of the number "
                     f"of devices {mesh.size}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this host's numpy batch slice into global arrays sharded over ``mesh``'s batch axis.

  Args:
    batch: dict of host arrays whose leading dim is this host's share of the global batch
      (the whole batch on a single host), e.g. ``image: [B/hosts, H, W, 3] uint8``.
    mesh: the training mesh.

  Returns:
    dict of global ``jax.Array``s with leading dim ``B`` (= per-host batch x process count),
    sharded with :func:`batch_sharding`.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    check_batch_size(global_shape[0], mesh)
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def replicated_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
  """The replicated sharding for every leaf of ``tree`` (params, optimizer state, metrics)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda _: sharding, tree)
