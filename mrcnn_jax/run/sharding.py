"""The device mesh and the shardings that training, evaluation and inference share.

One mesh axis, ``'data'`` (:data:`DATA_AXIS`), spans every device of every host. Batches are
split along their leading (batch) dimension over that axis and replicated over any other mesh
axis; parameters, optimizer state and metrics are replicated. XLA (GSPMD) inserts the gradient
all-reduce, so a step is written as if for one device holding the global batch.

Multi-host: call :func:`mrcnn_jax.run.distributed.initialize` first; each of
``jax.process_count()`` hosts then reads its own ``global / process_count`` examples per step
(:mod:`mrcnn_jax.data.pipeline`), and :func:`make_global_batch` stitches them into global
``jax.Array`` s. No data moves between hosts.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The model's shard-local parts (modeling/batch_parallel.py) name the same axis.
from mrcnn_jax.modeling.batch_parallel import DATA_AXIS

PyTree = Any

__all__ = [
    "DATA_AXIS", "batch_sharding", "check_batch_size", "make_global_batch", "make_mesh",
    "make_run_mesh", "replicated", "replicated_shardings",
]


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


def make_run_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The data-parallel mesh over ``config.num_devices`` devices (0 = all of every host).

  With several processes, ``num_devices`` (a global count) is taken evenly from every process,
  since each process feeds data to devices of its own.
  """
  n = int(config.get("num_devices", 0) or 0)
  devices = jax.devices()
  if n:
    if n > len(devices):
      raise ValueError(f"config.num_devices={n} but only {len(devices)} devices exist")
    num_p = jax.process_count()
    if n % num_p:
      raise ValueError(f"config.num_devices={n} must be a multiple of the process count {num_p}")
    by_process: dict[int, list] = {}
    for d in devices:
      by_process.setdefault(d.process_index, []).append(d)
    devices = [d for p in sorted(by_process) for d in by_process[p][:n // num_p]]
  return make_mesh(devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that puts a full copy of an array on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def replicated_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
  """The replicated sharding for every leaf of ``tree`` (params, optimizer state, metrics)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda _: sharding, tree)


def batch_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
  """The sharding of every batch field: dim 0 over ``axis``, the rest replicated."""
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has axes {mesh.axis_names}, no {axis!r} axis to shard the batch over")
  return NamedSharding(mesh, PartitionSpec(axis))


def check_batch_size(global_batch_size: int, mesh: Mesh, axis: str = DATA_AXIS) -> None:
  """Raises ``ValueError`` unless the global batch divides evenly over the ``axis`` devices."""
  num = mesh.shape[axis] if axis in mesh.axis_names else mesh.size
  if global_batch_size % num:
    raise ValueError(f"global batch size {global_batch_size} must be a multiple of the number "
                     f"of devices {num}")


def make_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                      axis: str = DATA_AXIS) -> dict[str, jax.Array]:
  """This host's batch -> global arrays whose leading (batch) dim is split over ``axis``.

  Args:
    host_batch: dict of host arrays whose leading dim is this host's share of the global batch
      (the whole batch on a single host), e.g. ``image: [B/hosts, H, W, 3] uint8``.
    mesh: the device mesh; its ``axis`` must span every device of every host that holds data.
    axis: the mesh axis the batch dimension is sharded over.

  Returns:
    The same keys, as ``jax.Array`` s of leading dim ``B`` (= per-host batch x process count),
    sharded with :func:`batch_sharding`.
  """
  sharding = batch_sharding(mesh, axis)
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"batch field {key!r} is a scalar; every field needs a batch dimension")
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    check_batch_size(global_shape[0], mesh, axis)
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
