"""RoIAlign's pooling as a loop over RoIs, with its own backward: the XLA:CPU form.

:func:`pool_rois_loop` has the signature and values of ``ops.roi_align.pool_all_rois`` (pass it
as ``pool_rois=``). Each RoI is pooled straight from its level's table (a ``switch`` on the
level), which saves concatenating the levels, a copy of the whole pyramid; the backward scatters
into one gradient buffer in place, RoI by RoI, where JAX's own transpose of the loop would add a
zero-filled copy of the whole table gradient per RoI.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.roi_align import pool_corners


def pool_rois_loop(tables: Sequence[jax.Array], level: jax.Array, index: jax.Array,
                   wy: jax.Array, wx: jax.Array) -> jax.Array:
  """``pool_corners`` one RoI at a time, from table ``tables[level[r]]``: the arguments and
  result of :func:`mrcnn_jax.ops.roi_align.pool_all_rois` ([R, oh, ow, C], tables' dtype)."""
  dtype = tables[0].dtype
  # CPUs have no bfloat16 arithmetic: pool in float32 and cast the result back.
  tables = [t.astype(jnp.float32) for t in tables]
  return _pool_loop(tables, level, index, wy, wx).astype(dtype)


@jax.custom_vjp
def _pool_loop(tables, level, index, wy, wx):
  branches = [functools.partial(pool_corners, t) for t in tables]
  return jax.lax.map(lambda args: jax.lax.switch(args[0], branches, *args[1:]),
                     (level, index, wy, wx))


def _pool_loop_fwd(tables, level, index, wy, wx):
  return _pool_loop(tables, level, index, wy, wx), (tables, level, index, wy, wx)


def _pool_loop_bwd(residuals, ct):
  """The backward, also one RoI at a time, scattering into the tables' gradients in place.

  Per RoI, with ``w[p,i,q,j] = wy[p,i] wx[q,j]`` and upstream ``ct``:
  d corner[p,i,q,j] = w * ct[p,q]; d wy[p,i] = sum_qj wx[q,j] t[p,i,q,j]; d wx likewise, where
  ``t[p,i,q,j] = sum_c corner[p,i,q,j,c] ct[p,q,c]``.
  """
  tables, level, index, wy, wx = residuals
  oh, g2 = wy.shape[-2:]
  ow = wx.shape[-2]
  c = tables[0].shape[-1]
  # One gradient buffer for all levels, updated in place by the loop (a per-level buffer
  # inside the ``switch`` would be copied on every iteration).
  sizes = [t.shape[0] for t in tables]
  offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]), jnp.int32)
  gathers = [lambda idx, t=t: t.at[idx].get(mode="promise_in_bounds") for t in tables]

  def body(r, carry):
    grad, d_wy, d_wx = carry
    idx, a, b, up = index[r], wy[r], wx[r], ct[r]
    corners = jax.lax.switch(level[r], gathers, idx).reshape(oh, g2, ow, g2, c)
    t = jnp.einsum("piqjc,pqc->piqj", corners, up)
    d_corners = (a[:, :, None, None, None] * b[None, None, :, :, None]
                 * up[:, None, :, None, :]).reshape(oh * g2, ow * g2, c)
    grad = grad.at[idx + offsets[level[r]]].add(d_corners, mode="promise_in_bounds")
    d_wy = d_wy.at[r].set(jnp.einsum("piqj,qj->pi", t, b))
    d_wx = d_wx.at[r].set(jnp.einsum("piqj,pi->qj", t, a))
    return grad, d_wy, d_wx

  init = (jnp.zeros((sum(sizes), c), jnp.float32), jnp.zeros_like(wy), jnp.zeros_like(wx))
  grad, d_wy, d_wx = jax.lax.fori_loop(0, level.shape[0], body, init)
  grads = [grad[o:o + n] for o, n in zip(np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)]
  return grads, None, None, d_wy, d_wx


_pool_loop.defvjp(_pool_loop_fwd, _pool_loop_bwd)
