"""2-D convolution whose gradients are matmuls, and a Flax ``Conv`` layer that uses it.

XLA's CPU backend lowers the *kernel* gradient of a convolution to another convolution over the
batch that runs far slower than the forward: measured on 2 cores at the R50-FPN 512x512 batch-2
shapes, 4-10x the forward for 1x1 convs (0.45 s vs 0.05 s for 256->128 at 128x128) and 6x for a
3x3 FPN output conv (3.5 s vs 0.6 s). :func:`conv2d` keeps XLA's convolution for the forward
and the input gradient, and computes the kernel gradient as one ``[C, N*Ho*Wo] x [N*Ho*Wo, O]``
matmul per kernel tap over the (strided) shifted input, which costs about what the forward does.
On other platforms (GPU, TPU) the backend's own kernel gradient is used.

Two more CPU speed-ups live in :func:`conv2d`: unpadded 1x1 convolutions are one matmul
(:func:`conv1x1`, on every platform), and large float32 3x3 stride-1 convolutions run as
Winograd F(4x4, 3x3) or F(5x5, 3x3) (:mod:`mrcnn_jax.modeling.winograd`), forward and
gradients.

:class:`Conv` is a drop-in for the ``flax.linen.Conv`` uses in this package (2-D, NHWC, no
dilation or groups): same parameter names (``kernel`` [kh, kw, in, out] HWIO, ``bias`` [out]),
initialisers, ``dtype``/``param_dtype`` handling and outputs, so checkpoints and the weight
converters are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import batch_parallel
from mrcnn_jax.modeling import winograd
from mrcnn_jax.ops._checks import check_shape

_DIMS = ("NHWC", "HWIO", "NHWC")

# False inside ``xla_convolutions()``: trace 3x3 convs as XLA convolutions on every platform.
_WINOGRAD_ON_CPU: contextvars.ContextVar = contextvars.ContextVar("mrcnn_jax_winograd",
                                                                  default=True)


@contextlib.contextmanager
def xla_convolutions():
  """While tracing inside this context, 3x3 convs stay XLA convolutions on CPU too.

  For measuring what accelerators run (e.g. XLA's FLOP estimate of a step, which for the
  Winograd form would count 4x fewer multiply-adds than a GPU or TPU executes), or for A/B
  timing. Values agree either way to float32 rounding.
  """
  token = _WINOGRAD_ON_CPU.set(False)
  try:
    yield
  finally:
    _WINOGRAD_ON_CPU.reset(token)


# Variable collection of precomputed Winograd kernel transforms (inference with fixed weights:
# ``modeling.prepare_inference``). ``Conv`` layers read theirs from it when it is present.
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
  # slice of x: contracting x's major axis ("nhwc,nhwo->co") made XLA:CPU copy every tap's
  # slice transposed, which cost more than the matmul (2.7 s -> 1.2 s for the mask head's
  # 256 x 14 x 14 x 256 3x3 conv).
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


def native_kernel_grad(x: jax.Array, ct: jax.Array, kernel: jax.Array,
                       strides: Tuple[int, int], pads: Pads) -> jax.Array:
  """The backend's own kernel gradient (what autodiff of the conv gives), float32 HWIO."""
  _, vjp_k = jax.vjp(lambda k: _conv(x, k, strides, pads), kernel)
  return vjp_k(ct)[0].astype(jnp.float32)


def _conv_mm_bwd(strides, pads, residuals, ct):
  x, kernel = residuals
  _, vjp_x = jax.vjp(lambda v: _conv(v, kernel, strides, pads), x)
  # Only XLA:CPU's kernel gradient is slow; accelerators keep their tuned convolution (cuDNN,
  # TPU). The branch is chosen when the step is lowered for a platform.
  ct_k = jax.lax.platform_dependent(
      x, ct,
      cpu=lambda x, ct: kernel_grad(x, ct, kernel.shape[:2], strides, pads),
      default=lambda x, ct: native_kernel_grad(x, ct, kernel, strides, pads))
  return vjp_x(ct)[0], ct_k.astype(kernel.dtype)


_conv_mm.defvjp(_conv_mm_fwd, _conv_mm_bwd)


def conv1x1(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int] = (1, 1)) -> jax.Array:
  """Unpadded 1x1 convolution as one matmul: x [N, H, W, C], kernel [1, 1, C, O] -> [N, Ho, Wo, O].

  A strided 1x1 convolution reads every ``s``-th pixel, so it is a strided slice and then
  ``[N*Ho*Wo, C] x [C, O]``. XLA:CPU runs that matmul 2-3.5x faster than its 1x1 convolution
  at the ResNet/FPN shapes (measured 36 -> 83 G multiply-adds/s for 256->128 at
  128x128), and its gradients are matmuls too. Accelerators lower both forms to the same
  matmul.
  """
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw]
  n, h, w, c = x.shape
  y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, kernel.shape[3]))
  return y.reshape(n, h, w, kernel.shape[3])


def winograd_tile(x_shape: Sequence[int], kernel_shape: Sequence[int],
                  stride: Union[int, Sequence[int]], padding: PaddingLike, dtype) -> Optional[int]:
  """The Winograd tile side :func:`conv2d` uses on CPU for these operands, or None if the
  convolution does not go through Winograd (shapes, dtype, a data-parallel mesh, or inside
  :func:`xla_convolutions`)."""
  strides = _pair(stride, "stride")
  pads = normalize_padding(padding, kernel_shape[:2], strides, x_shape[1:3])
  # XLA:CPU's 3x3 convolutions already run near the CPU's peak; Winograd does 4x fewer
  # multiply-adds (see winograd.py). Accelerators keep their own convolution algorithms.
  # Not under a data-parallel mesh: there XLA would all-reduce the kernel gradient in the
  # Winograd domain, [36, C, O], 4x the kernel's bytes (CPU meshes are for tests anyway).
  if (strides == (1, 1) and winograd.is_profitable(x_shape, kernel_shape, pads, dtype)
      and not batch_parallel.is_sharded() and _WINOGRAD_ON_CPU.get()):
    return winograd.forward_tile(x_shape, pads)
  return None


def conv2d(x: jax.Array, kernel: jax.Array, stride: Union[int, Sequence[int]] = 1,
           padding: PaddingLike = 0, transformed: Optional[jax.Array] = None) -> jax.Array:
  """Cross-correlation ``x`` [N, H, W, C] * ``kernel`` [kh, kw, C, O] -> [N, Ho, Wo, O].

  The same values and gradients as ``jax.lax.conv_general_dilated`` with NHWC/HWIO/NHWC
  dimension numbers, computed the fastest way we measured on each platform: unpadded 1x1
  convolutions as a matmul (:func:`conv1x1`); on CPU, large float32 3x3 stride-1 convolutions
  by Winograd (:mod:`mrcnn_jax.modeling.winograd`); the rest with XLA's convolution and, on
  CPU, a per-tap matmul kernel gradient (see the module docstring for why). ``padding`` is as
  in :func:`normalize_padding` (an int is torch's symmetric padding, e.g. ``(k - 1) // 2``).
  Both operands should share a dtype. ``transformed``: optionally the Winograd transform of
  ``kernel`` for the tile :func:`winograd_tile` gives, computed ahead of time (inference with
  fixed weights, see :class:`Conv`); used only where the CPU Winograd path runs.
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
  if winograd_tile(x.shape, kernel.shape, strides, pads, x.dtype) is not None:
    return jax.lax.platform_dependent(
        x, kernel, cpu=lambda x, k: winograd.conv3x3(x, k, pads, transformed=transformed),
        default=lambda x, k: _conv_mm(x, k, strides, pads))
  return _conv_mm(x, kernel, strides, pads)


class Conv(nn.Module):
  """2-D convolution layer, a drop-in for ``flax.linen.Conv`` as used in this package.

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
    y = conv2d(x, kernel, self.strides, self.padding, self._transformed_kernel(x, kernel))
    if bias is not None:
      y = y + bias.astype(dtype)
    return y[0] if unbatched else y

  def _transformed_kernel(self, x: jax.Array, kernel: jax.Array) -> Optional[jax.Array]:
    """This layer's Winograd kernel transform from the :data:`TRANSFORMED_KERNELS` collection.

    With the collection mutable (``modeling.prepare_inference``) it is computed and stored
    there; when the collection holds it, it is read instead of transformed again in every call.
    None where the layer does not run Winograd here, or the collection is not in use.
    """
    tile = winograd_tile(x.shape, kernel.shape, self.strides, self.padding, x.dtype)
    name = f"kernel_f{tile}"
    if tile is None or not (self.is_mutable_collection(TRANSFORMED_KERNELS)
                            or self.has_variable(TRANSFORMED_KERNELS, name)):
      return None
    return self.variable(TRANSFORMED_KERNELS, name, winograd.kernel_transform, kernel,
                         tile).value
