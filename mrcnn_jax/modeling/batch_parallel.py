"""Per-image parts of the model, run shard-locally under data parallelism.

Most of Mask R-CNN partitions by itself when the batch is sharded over a mesh's ``data`` axis:
XLA's SPMD partitioner splits convolutions, matmuls and elementwise ops along the batch. The
per-image, gather- and sort-heavy parts do not: RoIAlign indexes one flat pixel table per level
(``[B * H * W, C]``), and the proposal / sampling / detection steps are ``top_k`` and NMS over
each image. Left to the partitioner, the data-parallel step all-gathers every device's feature
maps for RoIAlign and every image's scores for ``top_k``, so each device does every image's
work and moves more bytes than the gradient all-reduce itself (docs/scaling.md).

These parts are independent per image, so they run under ``jax.shard_map`` over the data axis
instead: each device computes its own images, with no communication, and the numbers are the
same as without a mesh. The mesh is explicit (``MaskRCNN(config, mesh=...)`` passes its own);
without one, or on one device, the functions below are plain ``jax.vmap`` / calls, so notebook
use needs no mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def _active(mesh: Optional[Mesh], axis: str, batch_size: int) -> bool:
  """Whether to shard ``batch_size`` examples over ``mesh``'s ``axis`` (False: run unsharded)."""
  if mesh is None:
    return False
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} have no {axis!r} axis")
  n = mesh.shape[axis]
  if n == 1:
    return False
  if batch_size % n:
    raise ValueError(f"batch of {batch_size} does not split over {n} devices of mesh axis "
                     f"{axis!r}")
  return True


def _batch_size(args: Sequence[Any], axes: Sequence[Optional[int]]) -> int:
  for a, ax in zip(args, axes):
    if ax is not None:
      return jax.tree.leaves(a)[0].shape[ax]
  raise ValueError("at least one argument must be batched (in_axes 0)")


def per_example(fn: Callable, *args: Any,
                in_axes: Union[int, None, Sequence[Optional[int]]] = 0,
                mesh: Optional[Mesh] = None, axis: str = DATA_AXIS) -> Any:
  """``fn(*args)`` where ``fn`` maps a batch to a batch, image by image.

  Args:
    fn: a function of batched arguments whose outputs all have the batch as their leading
      dimension, and where output row ``b`` depends on input row ``b`` only (no reduction over
      the batch).
    *args: pytrees of arrays; those with ``in_axes`` 0 carry the batch on axis 0, those with
      ``None`` are shared by every image (replicated).
    in_axes: 0 or None, for all arguments or per argument.
    mesh: the data-parallel mesh, or None (then this is ``fn(*args)``).
    axis: the mesh axis the batch is split over.

  Returns:
    ``fn(*args)``: with a mesh of several devices computed shard by shard, with the same values.
  """
  axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
  if len(axes) != len(args) or any(a not in (0, None) for a in axes):
    raise ValueError(f"in_axes must be 0 or None per argument, got {in_axes!r}")
  if not _active(mesh, axis, _batch_size(args, axes)):
    return fn(*args)
  specs = tuple(P(axis) if a == 0 else P() for a in axes)
  # check_vma=False: a kernel's custom backward (the CPU RoI pooling loop) starts from a zero
  # buffer the replication checker would call device-invariant; every value is per-device.
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(axis),
                       check_vma=False)(*args)


def vmap(fn: Callable, in_axes: Union[int, None, Sequence[Optional[int]]] = 0, *,
         mesh: Optional[Mesh] = None, axis: str = DATA_AXIS) -> Callable:
  """``jax.vmap(fn, in_axes)`` (in_axes 0 or None), sharded over ``mesh``'s ``axis`` if given."""
  batched = jax.vmap(fn, in_axes=in_axes)
  return lambda *args: per_example(batched, *args, in_axes=in_axes, mesh=mesh, axis=axis)
