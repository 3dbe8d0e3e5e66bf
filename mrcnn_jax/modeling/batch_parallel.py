"""Per-image parts of the model, run shard-locally under data parallelism.

Most of Mask R-CNN partitions by itself when the batch is sharded over a mesh's ``data`` axis:
XLA's SPMD partitioner splits convolutions, matmuls and elementwise ops along the batch. The
per-image, gather- and sort-heavy parts do not: RoIAlign indexes one flat pixel table per level
(``[B * H * W, C]``) and runs a loop over RoIs, and the proposal / sampling / detection steps
are ``top_k`` and NMS over each image. Left to the partitioner, the compiled data-parallel train
step all-gathered every device's feature maps for RoIAlign and every image's scores for
``top_k``, so each device did every image's work and moved ~445 MiB per step at 256 px (it
grows with the image area: ~12 GiB at 1344 px), more than the gradient all-reduce itself
(``scripts/scaling_analysis.py`` measures both).

These parts are independent per image, so they run under ``jax.shard_map`` over the data axis
instead: each device computes its own images, with no communication, and the numbers are the
same as without a mesh. The mesh is given by the caller that jits the step
(``with data_parallel(mesh): ...`` while tracing); without one, or on one device, the
functions below are plain ``jax.vmap`` / calls, so notebook use needs no mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# (mesh, axis) set by ``data_parallel`` for the duration of a trace; None outside.
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("mrcnn_jax_data_mesh", default=None)


@contextlib.contextmanager
def data_parallel(mesh: Optional[Mesh], axis: str = DATA_AXIS) -> Iterator[None]:
  """Within this context, :func:`vmap` / :func:`per_example` shard their batch over ``axis``.

  Enter it inside the function being jitted (it acts at trace time), e.g.
  ``def step(state, batch): with data_parallel(mesh): return train_step(state, batch)``.
  ``mesh=None`` disables sharding (the plain computation).
  """
  if mesh is not None and axis not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} have no {axis!r} axis")
  token = _CURRENT.set(None if mesh is None else (mesh, axis))
  try:
    yield
  finally:
    _CURRENT.reset(token)


def _active(batch_size: int) -> Optional[tuple]:
  """The (mesh, axis) to shard ``batch_size`` examples over, or None to run unsharded."""
  current = _CURRENT.get()
  if current is None:
    return None
  mesh, axis = current
  n = mesh.shape[axis]
  if n == 1:
    return None
  if batch_size % n:
    raise ValueError(f"batch of {batch_size} does not split over {n} devices of mesh axis "
                     f"{axis!r}")
  return current


def is_sharded() -> bool:
  """Whether a :func:`data_parallel` mesh with more than one device is active (while tracing)."""
  current = _CURRENT.get()
  return current is not None and current[0].shape[current[1]] > 1


def _batch_size(args: Sequence[Any], axes: Sequence[Optional[int]]) -> int:
  for a, ax in zip(args, axes):
    if ax is not None:
      return jax.tree.leaves(a)[0].shape[ax]
  raise ValueError("at least one argument must be batched (in_axes 0)")


def per_example(fn: Callable, *args: Any,
                in_axes: Union[int, None, Sequence[Optional[int]]] = 0) -> Any:
  """``fn(*args)`` where ``fn`` maps a batch to a batch, image by image.

  Args:
    fn: a function of batched arguments whose outputs all have the batch as their leading
      dimension, and where output row ``b`` depends on input row ``b`` only (no reduction over
      the batch).
    *args: pytrees of arrays; those with ``in_axes`` 0 carry the batch on axis 0, those with
      ``None`` are shared by every image (replicated).
    in_axes: 0 or None, for all arguments or per argument.

  Returns:
    ``fn(*args)``: under :func:`data_parallel` computed shard by shard, with the same values.
  """
  axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
  if len(axes) != len(args) or any(a not in (0, None) for a in axes):
    raise ValueError(f"in_axes must be 0 or None per argument, got {in_axes!r}")
  active = _active(_batch_size(args, axes))
  if active is None:
    return fn(*args)
  mesh, axis = active
  specs = tuple(P(axis) if a == 0 else P() for a in axes)
  # check_vma=False: RoIAlign's custom backward starts its loop from a fresh zero buffer,
  # which shard_map's replication checker would flag as device-invariant; every value here
  # is per-device by construction.
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(axis),
                       check_vma=False)(*args)


def vmap(fn: Callable, in_axes: Union[int, None, Sequence[Optional[int]]] = 0) -> Callable:
  """``jax.vmap(fn, in_axes)`` (in_axes 0 or None), sharded over the data axis when active."""
  batched = jax.vmap(fn, in_axes=in_axes)
  return lambda *args: per_example(batched, *args, in_axes=in_axes)
