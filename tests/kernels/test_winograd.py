"""Winograd F(4x4, 3x3) conv and the 1x1-as-matmul conv against lax.conv_general_dilated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mrcnn_jax.kernels import conv as conv_lib
from mrcnn_jax.kernels import winograd


def _lax_conv(x, kernel, stride, pads):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _inputs(seed, shape, out_channels, k=3):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = (rng.standard_normal((k, k, shape[3], out_channels)) /
            np.sqrt(k * k * shape[3])).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(kernel)


def _value_and_grads(conv, x, kernel, seed):
  """Output and (d/dx, d/dkernel) of sum(conv(x, k) * w), jitted, for a random cotangent w."""
  out_shape = jax.eval_shape(conv, x, kernel).shape
  w = jnp.asarray(np.random.default_rng(seed + 100).standard_normal(out_shape), jnp.float32)

  def loss(a, b):
    y = conv(a, b)
    return jnp.sum(y * w), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
  return y, grads


def _assert_close(got, want, rel):
  """|got - want| <= rel * max|want|: Winograd's rounding error scales with the magnitudes."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  err = float(np.abs(got - want).max())
  scale = float(np.abs(want).max())
  assert err <= rel * scale, (err, scale)


@pytest.fixture
def always_winograd(monkeypatch):
  """Route every eligible conv to Winograd, also the small ones the tests can afford."""
  monkeypatch.setattr(winograd, "MIN_TILES", 1)


# Sizes that are and are not multiples of the 4x4 output tile, every padding 0..2, N > 1;
# 14x14 and 9x9 run F(5x5, 3x3) (see choose_tile), the others F(4x4, 3x3).
_CASES = [
    ((2, 9, 9, 5), 6, ((1, 1), (1, 1))),
    ((1, 14, 14, 8), 8, ((1, 1), (1, 1))),  # the mask head's 14x14: F(5x5)
    ((2, 13, 9, 3), 4, ((1, 1), (1, 1))),  # 13x9: F(5x5) with overhang on both axes
    ((3, 8, 13, 4), 3, ((0, 0), (0, 0))),
    ((1, 11, 6, 7), 5, ((2, 0), (0, 2))),
    ((2, 3, 3, 2), 4, ((0, 0), (0, 0))),  # one output pixel
    ((1, 1, 2, 3), 2, ((1, 1), (2, 1))),  # input smaller than the kernel, padding makes it fit
]


@pytest.mark.parametrize("shape,out_channels,pads", _CASES)
def test_conv3x3_matches_lax_values_and_grads(shape, out_channels, pads, always_winograd):
  for seed in (0, 1):
    x, kernel = _inputs(seed, shape, out_channels)
    y0, (gx0, gk0) = _value_and_grads(lambda a, b: _lax_conv(a, b, 1, pads), x, kernel, seed)
    y1, (gx1, gk1) = _value_and_grads(lambda a, b: winograd.conv3x3(a, b, pads), x, kernel, seed)
    _assert_close(y1, y0, 2e-5)
    _assert_close(gx1, gx0, 2e-5)
    _assert_close(gk1, gk0, 2e-5)


def test_conv3x3_at_model_scale():
  """256 channels, a P3-sized map: the rounding error stays ~1e-5 of the output's magnitude."""
  x, kernel = _inputs(3, (1, 32, 40, 256), 256)
  y0, (gx0, gk0) = _value_and_grads(lambda a, b: _lax_conv(a, b, 1, ((1, 1), (1, 1))), x,
                                    kernel, 3)
  y1, (gx1, gk1) = _value_and_grads(winograd.conv3x3, x, kernel, 3)
  _assert_close(y1, y0, 5e-5)
  _assert_close(gx1, gx0, 5e-5)
  _assert_close(gk1, gk0, 5e-5)


def test_conv3x3_check_grads_numerically(always_winograd):
  """Finite differences: catches a VJP that is self-consistent but wrong."""
  x, kernel = _inputs(4, (1, 6, 5, 2), 3)
  check_grads(lambda a, b: winograd.conv3x3(a, b, ((1, 2), (0, 1))), (x, kernel), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)


def test_conv3x3_second_call_of_the_vjp_under_vmap(always_winograd):
  x, kernel = _inputs(5, (2, 7, 9, 3), 4)
  xs = jnp.stack([x, -0.5 * x])

  def grads(conv):
    loss = lambda xs, k: jnp.sum(jax.vmap(lambda v: conv(v, k))(xs) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, kernel)

  for got, want in zip(grads(winograd.conv3x3),
                       grads(lambda a, b: _lax_conv(a, b, 1, ((1, 1), (1, 1))))):
    _assert_close(got, want, 2e-5)


@pytest.mark.parametrize("tile", winograd.TILES)
def test_transforms_are_each_others_transposes(tile):
  """<output_transform(m), y> == <m, output_transform^T(y)>, and the same for the kernel."""
  rng = np.random.default_rng(6)
  n, th, tw, o = 2, 3, 2, 5
  p = (tile + 2) ** 2
  out_h, out_w = tile * th - 2, tile * tw - 1
  m = jnp.asarray(rng.standard_normal((p, n * th * tw, o)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((n, out_h, out_w, o)), jnp.float32)
  lhs = jnp.sum(winograd.output_transform(m, n, th, tw, out_h, out_w, tile) * y)
  rhs = jnp.sum(m * winograd._output_transform_transpose(y, th, tw, tile))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
  g = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
  u = jnp.asarray(rng.standard_normal((p, 4, 5)), jnp.float32)
  lhs = jnp.sum(winograd.kernel_transform(g, tile) * u)
  rhs = jnp.sum(g * winograd._kernel_transform_transpose(u, tile))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_toom_cook_matrices_m4_are_lavin_and_grays():
  """F(4, 3) at (0, 1, -1, 2, -2, inf): the matrices printed in Lavin & Gray (2016), eq. 13."""
  bt, g, at = winograd.toom_cook_matrices(4)
  np.testing.assert_array_equal(bt, [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0],
                                     [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                                     [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])
  np.testing.assert_allclose(g, [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6],
                                 [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                                 [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], rtol=1e-15)
  np.testing.assert_array_equal(at, [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0],
                                     [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_toom_cook_matrices_compute_the_correlation(m):
  """A^T ((G g) * (B^T d)) == correlate(d, g) for every basis d, g: the bilinear form's
  coefficients, A^T[i, t] G[t, k] B^T[t, j], must be [j == i + k]."""
  bt, g, at = winograd.toom_cook_matrices(m)
  n = m + 2
  assert bt.shape == (n, n) and g.shape == (n, 3) and at.shape == (m, n)
  coeff = np.einsum("it,tk,tj->ikj", at, g, bt)
  want = np.zeros((m, 3, n))
  for i in range(m):
    for k in range(3):
      want[i, k, i + k] = 1
  np.testing.assert_allclose(coeff, want, atol=1e-12)


def test_choose_tile():
  # The mask head's 14x14: 3 tiles of 5 (441 transformed values) beat 4 of 4 (576).
  assert winograd.choose_tile(14, 14) == 5
  # Large maps (saving < 15%) and sizes that are multiples of 4 keep F(4x4).
  for hw in [(128, 128), (64, 64), (32, 32), (16, 16), (28, 28), (200, 304)]:
    assert winograd.choose_tile(*hw) == 4, hw


def test_conv3x3_rejects_bad_inputs():
  x, kernel = _inputs(0, (1, 8, 8, 4), 4)
  with pytest.raises(ValueError, match="kernel must be"):
    winograd.conv3x3(x, kernel[:, :, :3])
  with pytest.raises(ValueError, match="kernel must be"):
    winograd.conv3x3(x, jnp.zeros((5, 5, 4, 4)))
  with pytest.raises(ValueError, match="pads"):
    winograd.conv3x3(x, kernel, ((3, 3), (1, 1)))
  with pytest.raises(ValueError, match="smaller than"):
    winograd.conv3x3(x[:, :1], kernel, ((0, 0), (1, 1)))
  with pytest.raises(ValueError, match="rank"):
    winograd.conv3x3(x[0], kernel)


def test_is_profitable():
  f32 = jnp.float32
  # The FPN P2 output conv at 512 px: many tiles.
  assert winograd.is_profitable((1, 128, 128, 256), (3, 3, 256, 256), ((1, 1), (1, 1)), f32)
  # ResNet stage 5 at 512 px: 16 tiles, too few.
  assert not winograd.is_profitable((1, 16, 16, 512), (3, 3, 512, 512), ((1, 1), (1, 1)), f32)
  # bfloat16, non-3x3 kernels and pads Winograd cannot take stay on XLA's convolution.
  assert not winograd.is_profitable((1, 128, 128, 256), (3, 3, 256, 256), ((1, 1), (1, 1)),
                                    jnp.bfloat16)
  assert not winograd.is_profitable((1, 128, 128, 256), (5, 5, 256, 256), ((2, 2), (2, 2)), f32)
  assert not winograd.is_profitable((1, 128, 128, 256), (3, 3, 256, 256), ((3, 3), (1, 1)), f32)


def _n_convolutions(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text().count("convolution(")


@pytest.mark.parametrize("shape,pads", [((2, 9, 9, 5), ((1, 1), (1, 1))),    # F(5x5)
                                        ((1, 11, 6, 7), ((2, 0), (0, 2))),   # F(4x4)
                                        ((1, 14, 14, 8), ((1, 1), (1, 1)))])
def test_conv3x3_from_a_precomputed_kernel_transform(shape, pads):
  x, kernel = _inputs(5, shape, 4)
  tile = winograd.forward_tile(x.shape, pads)
  u = winograd.kernel_transform(kernel, tile)
  conv = jax.jit(lambda a, k, t: winograd.conv3x3(a, k, pads, transformed=t))
  want = _lax_conv(x, kernel, 1, pads)
  _assert_close(conv(x, kernel, u), want, 2e-5)
  # The transform is what is read (the kernel only fixes the expected shape).
  _assert_close(conv(x, kernel * 0, 2 * u), 2 * want, 2e-5)
  with pytest.raises(ValueError, match="transformed kernel must be"):
    winograd.conv3x3(x, kernel, pads, transformed=winograd.kernel_transform(kernel, 9 - tile))


def test_conv_layer_stores_and_reads_its_kernel_transform(always_winograd):
  """With the TRANSFORMED_KERNELS collection mutable a Conv stores its transform; given the
  collection, it reads it (a changed stored transform changes the output)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 5)), jnp.float32)
  layer = conv_lib.Conv(6, (3, 3), padding=1, use_bias=False)
  variables = layer.init(jax.random.key(0), x)
  plain = layer.apply(variables, x)
  _, state = layer.apply(variables, x, mutable=[conv_lib.TRANSFORMED_KERNELS])
  stored = state[conv_lib.TRANSFORMED_KERNELS]
  assert list(stored) == ["kernel_f5"]  # 9x9 outputs: 2 x 2 tiles of 5
  np.testing.assert_allclose(stored["kernel_f5"],
                             winograd.kernel_transform(variables["params"]["kernel"], 5))
  _assert_close(layer.apply({**variables, **state}, x), plain, 1e-6)
  doubled = {**variables, conv_lib.TRANSFORMED_KERNELS: {"kernel_f5": 2 * stored["kernel_f5"]}}
  _assert_close(layer.apply(doubled, x), 2 * plain, 2e-6)
  # Layers that do not run Winograd store nothing.
  strided = conv_lib.Conv(6, (3, 3), strides=2, padding=1)
  v2 = strided.init(jax.random.key(1), x)
  _, state2 = strided.apply(v2, x, mutable=[conv_lib.TRANSFORMED_KERNELS])
  assert not state2.get(conv_lib.TRANSFORMED_KERNELS)


def test_conv2d_routes_large_float32_3x3_to_winograd_on_cpu():
  """On CPU the compiled model conv has no XLA convolution, forward or backward."""
  assert jax.default_backend() == "cpu"
  x, kernel = _inputs(2, (1, 40, 40, 16), 16)  # 100 tiles >= MIN_TILES
  loss = lambda a, b: jnp.sum(conv_lib.conv2d(a, b, 1, 1) ** 2)
  assert _n_convolutions(jax.grad(loss, argnums=(0, 1)), x, kernel) == 0
  # ...and still gives XLA's values and gradients.
  y0, g0 = _value_and_grads(lambda a, b: _lax_conv(a, b, 1, ((1, 1), (1, 1))), x, kernel, 2)
  y1, g1 = _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, 1, 1), x, kernel, 2)
  for got, want in zip((y1,) + tuple(g1), (y0,) + tuple(g0)):
    _assert_close(got, want, 2e-5)
  # With use_winograd=False (ShardedConv) it stays a convolution.
  assert _n_convolutions(lambda a, b: conv_lib.conv2d(a, b, 1, 1, use_winograd=False), x,
                         kernel) == 1
  assert _n_convolutions(lambda a, b: conv_lib.conv2d(a, b, 1, 1) + 0, x, kernel) == 0
  # bfloat16 and strided 3x3 convs keep XLA's forward convolution.
  xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  assert _n_convolutions(lambda a, b: conv_lib.conv2d(a, b, 1, 1), xb, kb) == 1
  assert _n_convolutions(lambda a, b: conv_lib.conv2d(a, b, 2, 1), x, kernel) == 1


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_conv1x1_matches_lax_values_and_grads(stride, hw):
  x, kernel = _inputs(stride, (2,) + hw + (6,), 5, k=1)
  y0, (gx0, gk0) = _value_and_grads(lambda a, b: _lax_conv(a, b, stride, ((0, 0), (0, 0))), x,
                                    kernel, 0)
  y1, (gx1, gk1) = _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, stride, 0), x, kernel, 0)
  _assert_close(y1, y0, 1e-6)
  _assert_close(gx1, gx0, 1e-6)
  _assert_close(gk1, gk0, 1e-6)
  assert _n_convolutions(lambda a, b: conv_lib.conv2d(a, b, stride, 0), x, kernel) == 0


def test_conv_layer_keeps_xla_convolution_under_a_data_parallel_mesh():
  """On a mesh XLA would all-reduce Winograd's [36, C, O] kernel gradient (4x the bytes)."""
  from mrcnn_jax import kernels
  from mrcnn_jax.run import sharding as sharding_lib

  x, _ = _inputs(2, (8, 20, 20, 16), 16)  # 200 tiles: Winograd without a mesh
  mesh = sharding_lib.make_mesh(jax.devices()[:8])
  one = sharding_lib.make_mesh(jax.devices()[:1])
  assert kernels.select("cpu", mesh=mesh).conv is conv_lib.ShardedConv
  assert kernels.select("cpu", mesh=one).conv is conv_lib.Conv
  assert kernels.select("cpu").conv is conv_lib.Conv

  def n_convs(layer_cls):
    layer = layer_cls(16, (3, 3), padding=1)
    variables = layer.init(jax.random.key(0), x)
    return _n_convolutions(lambda v, a: layer.apply(v, a), variables, x)

  assert n_convs(conv_lib.Conv) == 0
  assert n_convs(conv_lib.ShardedConv) == 1
