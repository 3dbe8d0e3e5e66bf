"""XLA:CPU's 2-D convolution: matmul kernel gradients, 1x1 as a matmul, Winograd 3x3.

XLA's CPU backend lowers the *kernel* gradient of a convolution to another convolution over the
batch that runs several times slower than the forward. :func:`conv2d` keeps XLA's convolution
for the forward and the input gradient, and computes the kernel gradient as one
``[C, N*Ho*Wo] x [N*Ho*Wo, O]`` matmul per kernel tap over the (strided) shifted input, which
costs about what the forward does. Unpadded 1x1 convolutions are one matmul (:func:`conv1x1`),
and large float32 3x3 stride-1 convolutions run as Winograd F(4x4, 3x3) or F(5x5, 3x3)
(:mod:`mrcnn_jax.kernels.winograd`), forward and gradients.

:class:`Conv` is a drop-in for ``flax.linen.Conv`` as the model uses it (2-D, NHWC, no dilation
or groups): same parameter names (``kernel`` [kh, kw, in, out] HWIO, ``bias`` [out]),
initialisers, ``dtype``/``param_dtype`` handling and outputs, so checkpoints and the weight
converters are unchanged. :class:`ShardedConv` is the same without Winograd, for data-parallel
meshes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.kernels import winograd
from mrcnn_jax.modeling import layers
from mrcnn_jax.ops._checks import check_shape

_DIMS = ("NHWC", "HWIO", "NHWC")

# Variable collection of precomputed Winograd kernel transforms (inference with fixed weights:
# ``kernels.prepare_inference``). ``Conv`` layers read theirs from it when it is present.
TRANSFORMED_KERNELS = "winograd_kernels"

Pads = Tuple[Tuple[int, int], Tuple[int, int]]
PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]


def _pair(v: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f"{what} must be an int or a pair, got {v}")
  return v


def normalize_padding(padding: PaddingLike, kernel_hw: Sequence[int], strides: Sequence[int],
                      in_hw: Sequence[int]) -> Pads:
  """``padding`` as ``((top, bottom), (left, right))``.

  Accepts 'SAME' / 'VALID' (XLA's rule, as Flax), an int ``p`` (``p`` on every side), a pair
  ``(ph, pw)`` or a pair of pairs.
  """
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides),
                                   padding.upper())
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  padding = tuple(padding)
  if len(padding) != 2:
    raise ValueError(f"padding must have one entry per spatial axis, got {padding}")
  out = []
  for p in padding:
    lo, hi = (p, p) if isinstance(p, int) else _pair(p, "padding")
    if lo < 0 or hi < 0:
      raise ValueError(f"negative padding is not supported, got {padding}")
    out.append((lo, hi))
  return tuple(out)  # type: ignore[return-value]


def _conv(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int], pads: Pads) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_mm(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads)


def _conv_mm_fwd(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def kernel_grad(x: jax.Array, ct: jax.Array, kernel_hw: Tuple[int, int],
                strides: Tuple[int, int], pads: Pads) -> jax.Array:
  """Gradient of ``sum(ct * conv(x, k))`` w.r.t. ``k``: [kh, kw, C, O] float32.

  Tap ``(a, b)`` of the kernel sees input pixel ``(s*i + a - top, s*j + b - left)`` for output
  pixel ``(i, j)``, so its gradient is the strided, shifted input contracted with ``ct`` over
  batch and output pixels: one matmul per tap, accumulated in float32.
  """
  kh, kw = kernel_hw
  sh, sw = strides
  n, ho, wo, o = ct.shape
  c = x.shape[3]
  xp = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  # ct transposed once to [O, M] so each tap is the canonical [O, M] x [M, C] GEMM on a plain
  # slice of x (contracting x's major axis made XLA:CPU copy every tap's slice transposed).
  ct_t = ct.astype(x.dtype).reshape(n * ho * wo, o).T
  taps = []
  for a in range(kh):
    row = []
    for b in range(kw):
      xs = jax.lax.slice(xp, (0, a, b, 0), (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, c),
                         (1, sh, sw, 1))
      row.append(jnp.dot(ct_t, xs.reshape(n * ho * wo, c), preferred_element_type=jnp.float32))
    taps.append(jnp.stack(row))
  return jnp.stack(taps).transpose(0, 1, 3, 2)  # [kh, kw, O, C] -> HWIO


def _conv_mm_bwd(strides, pads, residuals, ct):
  x, kernel = residuals
  _, vjp_x = jax.vjp(lambda v: _conv(v, kernel, strides, pads), x)
  ct_k = kernel_grad(x, ct, kernel.shape[:2], strides, pads)
  return vjp_x(ct)[0], ct_k.astype(kernel.dtype)


_conv_mm.defvjp(_conv_mm_fwd, _conv_mm_bwd)


def conv1x1(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int] = (1, 1)) -> jax.Array:
  """Unpadded 1x1 convolution as one matmul: x [N, H, W, C], kernel [1, 1, C, O] -> [N, Ho, Wo, O].

  A strided 1x1 convolution reads every ``s``-th pixel, so it is a strided slice and then
  ``[N*Ho*Wo, C] x [C, O]``, which XLA:CPU runs faster than its 1x1 convolution, and whose
  gradients are matmuls too.
  """
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw]
  n, h, w, c = x.shape
  y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, kernel.shape[3]))
  return y.reshape(n, h, w, kernel.shape[3])


def winograd_tile(x_shape: Sequence[int], kernel_shape: Sequence[int],
                  stride: Union[int, Sequence[int]], padding: PaddingLike, dtype,
                  use_winograd: bool = True) -> Optional[int]:
  """The Winograd tile side :func:`conv2d` uses for these operands, or None if the convolution
  does not go through Winograd (shapes, dtype, or ``use_winograd`` False)."""
  strides = _pair(stride, "stride")
  pads = normalize_padding(padding, kernel_shape[:2], strides, x_shape[1:3])
  if (use_winograd and strides == (1, 1)
      and winograd.is_profitable(x_shape, kernel_shape, pads, dtype)):
    return winograd.forward_tile(x_shape, pads)
  return None


def conv2d(x: jax.Array, kernel: jax.Array, stride: Union[int, Sequence[int]] = 1,
           padding: PaddingLike = 0, transformed: Optional[jax.Array] = None,
           use_winograd: bool = True) -> jax.Array:
  """Cross-correlation ``x`` [N, H, W, C] * ``kernel`` [kh, kw, C, O] -> [N, Ho, Wo, O].

  The same values and gradients as ``jax.lax.conv_general_dilated`` with NHWC/HWIO/NHWC
  dimension numbers, computed the fast way for XLA:CPU: unpadded 1x1 convolutions as a matmul
  (:func:`conv1x1`); large float32 3x3 stride-1 convolutions by Winograd
  (:mod:`mrcnn_jax.kernels.winograd`) unless ``use_winograd`` is False; the rest with XLA's
  convolution and a per-tap matmul kernel gradient (see the module docstring for why).
  ``padding`` is as in :func:`normalize_padding` (an int is torch's symmetric padding, e.g.
  ``(k - 1) // 2``). Both operands should share a dtype. ``transformed``: optionally the
  Winograd transform of ``kernel`` for the tile :func:`winograd_tile` gives, computed ahead of
  time (inference with fixed weights, see :class:`Conv`); used only where Winograd runs.
  """
  check_shape("x", x, 4)
  check_shape("kernel", kernel, 4)
  if kernel.shape[2] != x.shape[3]:
    raise ValueError(f"kernel input channels {kernel.shape[2]} != x channels {x.shape[3]} "
                     f"(x {x.shape}, kernel {kernel.shape})")
  strides = _pair(stride, "stride")
  pads = normalize_padding(padding, kernel.shape[:2], strides, x.shape[1:3])
  if kernel.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
    return conv1x1(x, kernel, strides)
  if winograd_tile(x.shape, kernel.shape, strides, pads, x.dtype, use_winograd) is not None:
    return winograd.conv3x3(x, kernel, pads, transformed=transformed)
  return _conv_mm(x, kernel, strides, pads)


class Conv(nn.Module):
  """2-D convolution layer by :func:`conv2d`, a drop-in for ``flax.linen.Conv`` as the model
  uses it.

  Inputs are NHWC ([N, H, W, C], or [H, W, C] unbatched); parameters ``kernel``
  [kh, kw, C, features] and ``bias`` [features] in ``param_dtype``; both input and parameters
  are cast to ``dtype`` (when None, the input's and parameters' common type), as Flax does.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw) or an int.
    padding: 'SAME', 'VALID', an int, or per-axis pairs (see :func:`normalize_padding`).
    use_bias: whether to add ``bias``.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    kernel_init, bias_init: initialisers, as Flax's.
    use_winograd: whether large float32 3x3 stride-1 convs run as Winograd.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: PaddingLike = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  use_winograd: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] or [H, W, C] -> [N, Ho, Wo, features] (or unbatched)."""
    unbatched = x.ndim == 3
    if unbatched:
      x = x[None]
    if isinstance(self.kernel_size, int):
      # flax.linen.Conv reads an int as a 1-D kernel; be explicit instead of guessing.
      raise TypeError(f"kernel_size must be a pair (kh, kw), got {self.kernel_size}")
    kh, kw = _pair(self.kernel_size, "kernel_size")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    # Flax's promote_dtype: an explicit dtype wins, else the operands' common type.
    dtype = (self.dtype if self.dtype is not None
             else jnp.result_type(x.dtype, self.param_dtype))
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = conv2d(x, kernel, self.strides, self.padding, self._transformed_kernel(x, kernel),
               self.use_winograd)
    if bias is not None:
      y = layers.add_bias(y, bias)  # its gradient summed in float32 under any dtype
    return y[0] if unbatched else y

  def _transformed_kernel(self, x: jax.Array, kernel: jax.Array) -> Optional[jax.Array]:
    """This layer's Winograd kernel transform from the :data:`TRANSFORMED_KERNELS` collection.

    With the collection mutable (``kernels.prepare_inference``) it is computed and stored
    there; when the collection holds it, it is read instead of transformed again in every call.
    None where the layer does not run Winograd here, or the collection is not in use.
    """
    tile = winograd_tile(x.shape, kernel.shape, self.strides, self.padding, x.dtype,
                         self.use_winograd)
    name = f"kernel_f{tile}"
    if tile is None or not (self.is_mutable_collection(TRANSFORMED_KERNELS)
                            or self.has_variable(TRANSFORMED_KERNELS, name)):
      return None
    return self.variable(TRANSFORMED_KERNELS, name, winograd.kernel_transform, kernel,
                         tile).value


class ShardedConv(Conv):
  """:class:`Conv` without Winograd, for data-parallel meshes: there XLA would all-reduce the
  kernel gradient in the Winograd domain, [36, C, O], 4x the kernel's bytes."""

  use_winograd: bool = False
