"""3x3 stride-1 convolution by Winograd's minimal filtering F(m x m, 3x3), for XLA:CPU.

A 3x3 convolution computes each 4x4 block of output pixels from a 6x6 block of input pixels
with 144 multiply-adds per (input, output) channel pair. Winograd's algorithm (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016) computes the same block with 36:

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, per channel pair)

where ``d`` is the 6x6 input tile, ``g`` the 3x3 kernel and ``B^T`` [6, 6], ``G`` [6, 3],
``A^T`` [4, 6] are fixed matrices (interpolation points 0, +-1, +-2, infinity).
Summed over input channels, the elementwise product becomes 36 independent matmuls
``[tiles, C] x [C, O]`` -- one per position of the transformed 6x6 tile -- so the whole
convolution is: an input transform, one batched matmul with 4x fewer multiply-adds than the
direct convolution, and an output transform.

The same construction with one more point (1/2) gives F(5x5, 3x3): 7x7 input tiles, 49
products per 25 outputs. :func:`toom_cook_matrices` builds either from the points (exactly, in
rationals), and :func:`choose_tile` takes 5x5 tiles where they fit the output much better
than 4x4 ones: the mask head's 14x14 maps are 3 x 5 (15) instead of 4 x 4 (16) tiles a side,
23% fewer transformed values and products.

Why it exists: XLA:CPU's convolutions already run near the CPU's peak, so the only way to make
them faster is to do less arithmetic. The gradients are Winograd too (:func:`conv3x3`'s VJP),
and save more, because XLA:CPU's own convolution gradients are slower still. For small maps
with many channels (ResNet stage 5) the matmuls are too small to win; :func:`is_profitable`
keeps XLA's convolution there (docs/benchmarks.md has the measurements).

Accuracy: the transforms scale values by up to ~10, so float32 results differ from the direct
convolution by about 1e-5 of the output's magnitude (tests check this); bfloat16 inputs are
not routed here (see :func:`is_profitable`). Only the CPU kernel set uses it
(:mod:`mrcnn_jax.kernels.conv`), and not under a data-parallel mesh (where XLA would all-reduce
the kernel gradient in its 4x larger transformed form).
"""

from __future__ import annotations

from fractions import Fraction
import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops._checks import check_shape

# Interpolation points of the Toom-Cook construction, in the order they are taken: the standard
# choice (Lavin & Gray; NNPACK), small integers and halves, whose transforms stay exact in
# float32. F(m x m, 3 x 3) uses the first m + 1 of them plus the point at infinity.
_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2))


def _poly_from_roots(roots: Sequence[Fraction]) -> List[Fraction]:
  """Coefficients (lowest power first) of prod (x - r)."""
  coeffs = [Fraction(1)]
  for r in roots:
    shifted = [Fraction(0)] + coeffs          # x * p(x)
    coeffs = [a - r * b for a, b in zip(shifted, coeffs + [Fraction(0)])]
  return coeffs


def toom_cook_matrices(m: int, r: int = 3) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(B^T, G, A^T)`` of F(m, r), exact rationals rounded once to float64.

  With finite points ``a_0 .. a_{n-2}`` (``n = m + r - 1``) and infinity (Toom-Cook):
  ``A^T[i, j] = a_j^i`` (the infinity column is ``[i == m-1]``); ``G[j, k] = a_j^k / f_j`` with
  ``f_j = prod_{l != j} (a_j - a_l)`` (the infinity row is ``[k == r-1]``); row ``j`` of ``B^T``
  holds the coefficients of ``prod_{l != j} (x - a_l)`` and its last row those of
  ``prod_l (x - a_l)``. Then for every input ``d`` [n] and filter ``g`` [r],
  ``A^T ((G g) * (B^T d))`` is the correlation ``y_i = sum_k d_{i+k} g_k``, i < m (the tests
  check this identity). For m = 4 these are the matrices of Lavin & Gray's paper.
  """
  n = m + r - 1
  if not 1 <= n - 1 <= len(_POINTS):
    raise ValueError(f"F({m}, {r}) needs {n - 1} finite points; {len(_POINTS)} are defined")
  pts = _POINTS[:n - 1]
  at = [[a ** i for a in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
  g = []
  for j, a in enumerate(pts):
    f = Fraction(1)
    for l, b in enumerate(pts):
      if l != j:
        f *= a - b
    g.append([a ** k / f for k in range(r)])
  g.append([Fraction(int(k == r - 1)) for k in range(r)])
  bt = [_poly_from_roots(pts[:j] + pts[j + 1:]) + [Fraction(0)] for j in range(n - 1)]
  bt.append(_poly_from_roots(pts))
  as_array = lambda rows: np.array([[float(v) for v in row] for row in rows], np.float64)
  return as_array(bt), as_array(g), as_array(at)


Pads = Tuple[Tuple[int, int], Tuple[int, int]]

# Output tile sides used: F(4x4, 3x3) by default, F(5x5, 3x3) where it covers the output with
# much less overhang (see :func:`choose_tile`).
TILES = (4, 5)
# A larger tile must cut the transformed size (positions x tiles, what the matmuls and
# transforms scale with) by at least this fraction to be chosen. F(5x5) does 49 multiply-adds
# per 25 outputs against F(4x4)'s 36 per 16, 13% fewer, but its transforms cost more per tile,
# so it pays only where it also cuts the overhang (the mask head's 14x14: 23% fewer values).
_MIN_SAVING = 0.15


@functools.lru_cache(maxsize=None)
def _matrices(m: int):
  """float64 ``(B^T, G (x) G, A^T (x) A^T)`` of F(m x m, 3 x 3)."""
  bt, g, at = toom_cook_matrices(m)
  return bt, np.kron(g, g), np.kron(at, at)


def tile_counts(out_h: int, out_w: int, tile: int = 4) -> Tuple[int, int]:
  """Tiles per axis covering an ``out_h`` x ``out_w`` output (the last ones may overhang)."""
  return -(-out_h // tile), -(-out_w // tile)


def transformed_size(out_h: int, out_w: int, tile: int) -> int:
  """Values per (image, channel) after the input transform: ``(tile + 2)^2`` per tile."""
  th, tw = tile_counts(out_h, out_w, tile)
  return (tile + 2) ** 2 * th * tw


def choose_tile(out_h: int, out_w: int) -> int:
  """The output tile side for an ``out_h`` x ``out_w`` output: 4 unless a larger one in
  :data:`TILES` shrinks the transformed size by at least 15% (14x14 -> 5)."""
  best = TILES[0]
  for t in TILES[1:]:
    size, best_size = transformed_size(out_h, out_w, t), transformed_size(out_h, out_w, best)
    if size <= (1 - _MIN_SAVING) * best_size:
      best = t
  return best


# Below this many tiles per matmul (N * tiles_h * tiles_w), the 36 small matmuls and the
# transforms cost about as much as XLA's direct convolution or more (a rough threshold).
MIN_TILES = 64


def _pads_fit_kernel(pads: Pads) -> bool:
  """Every pad in [0, 2]: a 3x3 kernel's windows can reach at most 2 pixels of padding."""
  return all(0 <= p <= 2 for pair in pads for p in pair)


def is_profitable(x_shape: Sequence[int], kernel_shape: Sequence[int], pads: Pads,
                  dtype) -> bool:
  """Whether a stride-1 conv of ``x_shape`` [N, H, W, C] should use Winograd on CPU.

  float32 only (the transforms' growth would cost bfloat16 most of its 8 mantissa bits), 3x3
  kernels, pads in [0, 2], and enough tiles for the matmuls to be efficient.
  """
  if tuple(kernel_shape[:2]) != (3, 3) or jnp.dtype(dtype) != jnp.float32:
    return False
  if not _pads_fit_kernel(pads):
    return False
  out_h, out_w = _out_size(x_shape, pads)
  if out_h < 1 or out_w < 1:
    return False
  th, tw = tile_counts(out_h, out_w, choose_tile(out_h, out_w))
  return x_shape[0] * th * tw >= MIN_TILES


def _combine(matrix: np.ndarray, parts):
  """``[sum_i matrix[j, i] * parts[i] for j]`` with the zero terms left out (fusable adds)."""
  out = []
  for row in matrix:
    acc = None
    for coeff, part in zip(row, parts):
      if coeff == 0:
        continue
      term = part if coeff == 1 else (-part if coeff == -1 else part * float(coeff))
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def input_transform(x: jax.Array, pads: Pads, th: int, tw: int, tile: int = 4) -> jax.Array:
  """``B^T d B`` for every tile: x [N, H, W, C] -> [(tile+2)^2, N * th * tw, C].

  ``x`` is zero-padded by ``pads`` ((top, bottom), (left, right)) and then on the bottom and
  right as far as the last tile needs.

  Row offset ``i`` of every tile is one strided slice ``x[:, i::tile]``; the transform along H
  combines those, then the same along W. XLA:CPU fuses these slices and adds into a few
  passes over memory (faster than gathering 6x6 tiles by reshapes and then combining, or than
  a dense [36, 36] matmul with ``B^T (x) B^T``).
  """
  n, h, w, c = x.shape
  a = tile + 2  # input tile side
  bt = _matrices(tile)[0]
  (top, _), (left, _) = pads
  x = jnp.pad(x, ((0, 0), (top, tile * th + 2 - h - top), (left, tile * tw + 2 - w - left),
                  (0, 0)))
  rows = [jax.lax.slice_in_dim(x, i, i + tile * (th - 1) + 1, tile, axis=1)
          for i in range(a)]  # a x [N, th, W', C]
  rows = jnp.stack(_combine(bt, rows))  # [a, N, th, W', C]
  # The column transform on all row combinations at once: 2a ops instead of 2a^2, which
  # keeps the compiled model's op count (and compile time) down at the same speed.
  cols = [jax.lax.slice_in_dim(rows, j, j + tile * (tw - 1) + 1, tile, axis=3)
          for j in range(a)]  # a x [a, N, th, tw, C]
  v = jnp.stack(_combine(bt, cols), axis=1)  # [a, a, N, th, tw, C]
  return v.reshape(a * a, n * th * tw, c)


# The kernel transform is one small matmul with G (x) G over the 9 taps: one pass over memory,
# where the same sums as elementwise ops make several.


def kernel_transform(kernel: jax.Array, tile: int = 4) -> jax.Array:
  """``G g G^T``: kernel [3, 3, C, O] -> [(tile+2)^2, C, O]."""
  gg = _matrices(tile)[1]
  c, o = kernel.shape[2], kernel.shape[3]
  return jnp.dot(jnp.asarray(gg, kernel.dtype), kernel.reshape(9, c * o)).reshape(-1, c, o)


def _kernel_transform_transpose(du: jax.Array, tile: int = 4) -> jax.Array:
  """Transpose of :func:`kernel_transform`: [(tile+2)^2, C, O] -> [3, 3, C, O]."""
  gg = _matrices(tile)[1]
  c, o = du.shape[1], du.shape[2]
  return jnp.dot(jnp.asarray(gg.T, du.dtype), du.reshape(-1, c * o)).reshape(3, 3, c, o)


# The output transform and its transpose are small dense matmuls with A^T (x) A^T: one pass
# over the matmul's output, which XLA runs faster than the equivalent chain of fused adds.


def output_transform(m: jax.Array, n: int, th: int, tw: int, out_h: int, out_w: int,
                     tile: int = 4) -> jax.Array:
  """``A^T m A`` per tile, tiles stitched and cropped:
  [(tile+2)^2, N*th*tw, O] -> [N, out_h, out_w, O]."""
  aa = _matrices(tile)[2]
  o = m.shape[-1]
  y = jnp.dot(jnp.asarray(aa, m.dtype), m.reshape(aa.shape[1], -1))
  y = y.reshape(tile, tile, n, th, tw, o).transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(n, tile * th, tile * tw, o)[:, :out_h, :out_w]


def _output_transform_transpose(ct: jax.Array, th: int, tw: int, tile: int = 4) -> jax.Array:
  """Transpose of :func:`output_transform`: ct [N, out_h, out_w, O] -> [(tile+2)^2, N*th*tw, O]."""
  aa = _matrices(tile)[2]
  n, out_h, out_w, o = ct.shape
  ct = jnp.pad(ct, ((0, 0), (0, tile * th - out_h), (0, tile * tw - out_w), (0, 0)))
  ct = ct.reshape(n, th, tile, tw, tile, o).transpose(2, 4, 0, 1, 3, 5)
  dm = jnp.dot(jnp.asarray(aa.T, ct.dtype), ct.reshape(tile * tile, -1))
  return dm.reshape(aa.shape[1], n * th * tw, o)


def _batched_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """[P, T, K] x [P, K, M] -> [P, T, M] (one matmul per transformed position)."""
  return jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))


def _out_size(x_shape: Sequence[int], pads: Pads) -> Tuple[int, int]:
  (top, bottom), (left, right) = pads
  return x_shape[1] + top + bottom - 2, x_shape[2] + left + right - 2


def forward_tile(x_shape: Sequence[int], pads: Pads) -> int:
  """The tile side :func:`conv3x3` uses for an input of ``x_shape`` [N, H, W, C] with ``pads``
  (the ``tile`` a precomputed :func:`kernel_transform` for it must have)."""
  return choose_tile(*_out_size(x_shape, pads))


def _forward(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
  return _forward_transformed(x, kernel_transform(kernel, forward_tile(x.shape, pads)), pads)


def _forward_transformed(x: jax.Array, u: jax.Array, pads: Pads) -> jax.Array:
  """The convolution from the transformed kernel ``u`` [(tile+2)^2, C, O]."""
  out_h, out_w = _out_size(x.shape, pads)
  tile = choose_tile(out_h, out_w)
  th, tw = tile_counts(out_h, out_w, tile)
  m = _batched_matmul(input_transform(x, pads, th, tw, tile), u)
  return output_transform(m, x.shape[0], th, tw, out_h, out_w, tile)


def check_pads(pads: Pads) -> Pads:
  """``pads`` as a tuple of int pairs, each in [0, 2] (what a 3x3 kernel can use)."""
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != 2 or not _pads_fit_kernel(pads):
    raise ValueError(f"pads must be ((top, bottom), (left, right)) with each in [0, 2], got {pads}")
  return pads  # type: ignore[return-value]


def conv3x3(x: jax.Array, kernel: jax.Array, pads: Pads = ((1, 1), (1, 1)),
            transformed: Optional[jax.Array] = None) -> jax.Array:
  """3x3 stride-1 cross-correlation with zero padding, by Winograd F(m x m, 3x3).

  Args:
    x: [N, H, W, C] float32.
    kernel: [3, 3, C, O] float32, HWIO.
    pads: ((top, bottom), (left, right)), each in [0, 2]; the default is torch's ``padding=1``
      ('SAME').
    transformed: optional ``kernel_transform(kernel, forward_tile(x.shape, pads))``, computed
      ahead of time, used instead of transforming ``kernel`` in this call. For inference with
      fixed weights (``kernels.prepare_inference``): the transform is a pass that writes 4-5x
      the kernel's bytes, in every call. Gradients then go to ``transformed``, not ``kernel``.

  Returns:
    [N, H + top + bottom - 2, W + left + right - 2, O], equal to ``lax.conv_general_dilated(x,
    kernel, (1, 1), pads)`` up to float32 rounding (~1e-5 of the output's magnitude). The VJP
    is Winograd as well: the input gradient is this function applied to the cotangent with
    the flipped kernel (pads ``2 - p``), and the kernel gradient is one ``[C, tiles] x
    [tiles, O]`` matmul per transformed tile position.
  """
  check_shape("x", x, 4)
  check_shape("kernel", kernel, 4)
  if kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"kernel must be [3, 3, {x.shape[3]}, O], got {kernel.shape}")
  pads = check_pads(pads)
  out_h, out_w = _out_size(x.shape, pads)
  if out_h < 1 or out_w < 1:
    raise ValueError(f"input {x.shape[1:3]} with pads {pads} is smaller than the 3x3 kernel")
  if transformed is not None:
    tile = forward_tile(x.shape, pads)
    want = ((tile + 2) ** 2,) + tuple(kernel.shape[2:])
    if tuple(transformed.shape) != want:
      raise ValueError(f"transformed kernel must be {list(want)} (F({tile}x{tile}, 3x3) of a "
                       f"{list(kernel.shape)} kernel), got {list(transformed.shape)}")
    return _forward_transformed(x, transformed.astype(x.dtype), pads)
  return _conv3x3(x, kernel, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, kernel, pads):
  return _forward(x, kernel, pads)


def _conv3x3_fwd(x, kernel, pads):
  return _forward(x, kernel, pads), (x, kernel)


def _conv3x3_bwd(pads, residuals, ct):
  x, kernel = residuals
  (top, bottom), (left, right) = pads
  tile = choose_tile(ct.shape[1], ct.shape[2])  # the forward's tiling
  th, tw = tile_counts(ct.shape[1], ct.shape[2], tile)
  # d/dx: the "full" correlation of ct with the spatially flipped kernel (in/out swapped),
  # cropped to x: padding ct by 2 - p on each side gives exactly x's rows and columns.
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  back_pads = ((2 - top, 2 - bottom), (2 - left, 2 - right))
  if is_profitable(ct.shape, flipped.shape, back_pads, ct.dtype):
    dx = _conv3x3(ct, flipped, back_pads)
  else:
    dx = jax.lax.conv_general_dilated(ct, flipped, (1, 1), back_pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # d/dkernel: per transformed position, V^T [C, tiles] x dM [tiles, O]; then G^T . G.
  v = input_transform(x, pads, th, tw, tile)
  dm = _output_transform_transpose(ct, th, tw, tile)
  du = jax.lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))  # [(tile+2)^2, C, O]
  return dx.astype(x.dtype), _kernel_transform_transpose(du, tile).astype(kernel.dtype)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
