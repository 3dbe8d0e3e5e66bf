"""conv2d / Conv (matmul kernel gradient) against lax.conv_general_dilated and flax's nn.Conv."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mrcnn_jax.kernels import conv as conv_lib


def _lax_conv(x, kernel, stride, pads):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _value_and_grads(conv):
  """jit(value and (d/dx, d/dk) of sum(conv(x, k) * w)) for a fixed random cotangent w."""

  def loss(x, kernel, w):
    y = conv(x, kernel)
    return jnp.sum(y.astype(jnp.float32) * w), y

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _inputs(seed, n, h, w, c, o, k, dtype):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  kernel = (rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c)).astype(np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)


def _assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  scale = max(float(np.abs(want).max()), 1e-6)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(9, 9), (8, 10), (11, 6)])
def test_forward_and_grads_match_lax_float32(k, stride, hw):
  h, w = hw
  pad = (k - 1) // 2
  pads = ((pad, pad), (pad, pad))
  for seed in (0, 1):
    x, kernel = _inputs(seed, 2, h, w, 3, 5, k, jnp.float32)
    ref = _value_and_grads(lambda a, b: _lax_conv(a, b, stride, pads))
    new = _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, stride, pad))
    out_shape = jax.eval_shape(lambda a, b: _lax_conv(a, b, stride, pads), x, kernel).shape
    wgt = jnp.asarray(np.random.default_rng(seed + 10).standard_normal(out_shape), jnp.float32)
    (v0, y0), (gx0, gk0) = ref(x, kernel, wgt)
    (v1, y1), (gx1, gk1) = new(x, kernel, wgt)
    _assert_close(y1, y0, 1e-5)
    _assert_close(v1, v0, 1e-5)
    _assert_close(gx1, gx0, 1e-5)
    _assert_close(gk1, gk0, 1e-5)
    assert gk1.dtype == jnp.float32 and gx1.dtype == jnp.float32


@pytest.mark.parametrize("k,stride", [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)])
def test_forward_and_grads_match_lax_bfloat16(k, stride):
  pad = (k - 1) // 2
  pads = ((pad, pad), (pad, pad))
  x, kernel = _inputs(3, 2, 10, 9, 8, 6, k, jnp.bfloat16)
  ref = _value_and_grads(lambda a, b: _lax_conv(a, b, stride, pads))
  new = _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, stride, pad))
  out_shape = jax.eval_shape(lambda a, b: _lax_conv(a, b, stride, pads), x, kernel).shape
  wgt = jnp.asarray(np.random.default_rng(4).standard_normal(out_shape), jnp.float32)
  (_, y0), (gx0, gk0) = ref(x, kernel, wgt)
  (_, y1), (gx1, gk1) = new(x, kernel, wgt)
  assert y1.dtype == gx1.dtype == gk1.dtype == jnp.bfloat16
  _assert_close(y1, y0, 2e-2)
  _assert_close(gx1, gx0, 2e-2)
  _assert_close(gk1, gk0, 2e-2)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 2), (1, 0)), (2, 1)])
def test_padding_forms_match_lax(padding):
  x, kernel = _inputs(5, 1, 9, 8, 2, 3, 3, jnp.float32)
  pads = conv_lib.normalize_padding(padding, (3, 3), (2, 2), (9, 8))
  lax_pads = padding if isinstance(padding, str) else pads
  if padding == "SAME":
    assert pads == ((1, 1), (0, 1))  # XLA's rule: 9 -> 5 rows (pad 2), 8 -> 4 cols (pad 1)
  ref = _value_and_grads(lambda a, b: _lax_conv(a, b, 2, lax_pads))
  new = _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, 2, padding))
  out_shape = jax.eval_shape(lambda a, b: _lax_conv(a, b, 2, lax_pads), x, kernel).shape
  wgt = jnp.asarray(np.random.default_rng(6).standard_normal(out_shape), jnp.float32)
  (_, y0), g0 = ref(x, kernel, wgt)
  (_, y1), g1 = new(x, kernel, wgt)
  _assert_close(y1, y0, 1e-5)
  for a, b in zip(g1, g0):
    _assert_close(a, b, 1e-5)


def test_check_grads_tiny():
  x, kernel = _inputs(7, 1, 5, 4, 2, 3, 3, jnp.float32)
  check_grads(lambda a, b: conv_lib.conv2d(a, b, 2, 1), (x, kernel), order=1, modes=["rev"],
              atol=1e-2, rtol=1e-2, eps=1e-2)
  check_grads(lambda a, b: conv_lib.conv2d(a, b, 1, 0), (x, kernel[:1, :1]), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)


def test_kernel_gradient_has_no_convolution():
  """The point of the module: the compiled kernel gradient is matmuls, not a convolution.

  Compiled for XLA:CPU, also on a GPU host.
  """
  cpu = jax.devices("cpu")[0]
  x, kernel = jax.device_put(_inputs(8, 2, 8, 8, 4, 4, 3, jnp.float32), cpu)

  def n_convs(conv):
    loss = lambda k: jnp.sum(jnp.square(conv(x, k)))
    return jax.jit(jax.grad(loss)).lower(kernel).compile().as_text().count("convolution(")

  assert n_convs(lambda a, b: _lax_conv(a, b, 2, ((1, 1), (1, 1)))) == 2  # forward + gradient
  assert n_convs(lambda a, b: conv_lib.conv2d(a, b, 2, 1)) == 1  # the forward only


def test_under_vmap():
  x, kernel = _inputs(9, 2, 7, 7, 3, 4, 3, jnp.float32)
  xs = jnp.stack([x, -2.0 * x])

  def loss(conv):
    return jax.jit(jax.grad(lambda xs, k: jnp.sum(jax.vmap(lambda v: conv(v, k))(xs) ** 2),
                            argnums=(0, 1)))

  g0 = loss(lambda a, b: _lax_conv(a, b, 2, ((1, 1), (1, 1))))(xs, kernel)
  g1 = loss(lambda a, b: conv_lib.conv2d(a, b, 2, 1))(xs, kernel)
  for a, b in zip(g1, g0):
    _assert_close(a, b, 1e-5)


@pytest.mark.parametrize("dtype,in_dtype", [(jnp.float32, jnp.float32),
                                            (jnp.bfloat16, jnp.float32),
                                            (None, jnp.bfloat16), (None, jnp.float32)])
@pytest.mark.parametrize("kernel_size,strides,padding,use_bias", [
    ((3, 3), 1, ((1, 1), (1, 1)), True), ((1, 1), (2, 2), ((0, 0), (0, 0)), False),
    ((3, 3), 2, "SAME", True), ((7, 7), 2, ((3, 3), (3, 3)), False), ((3, 3), 1, 1, True)])
def test_module_matches_flax_conv(dtype, in_dtype, kernel_size, strides, padding, use_bias):
  kw = dict(features=6, kernel_size=kernel_size, strides=strides, padding=padding,
            use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            bias_init=nn.initializers.normal(0.5))
  ref, new = nn.Conv(**kw), conv_lib.Conv(**kw)
  x = jnp.asarray(np.random.default_rng(11).standard_normal((2, 9, 10, 4)), in_dtype)
  p0 = ref.init(jax.random.PRNGKey(0), x)
  p1 = new.init(jax.random.PRNGKey(0), x)
  # Same tree, shapes, dtypes and (same key) values: checkpoints and converters carry over.
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  y0, y1 = jax.jit(ref.apply)(p0, x), jax.jit(new.apply)(p0, x)
  assert y0.dtype == y1.dtype and y0.shape == y1.shape
  _assert_close(y1, y0, 2e-2 if jnp.bfloat16 in (dtype, in_dtype) else 1e-5)
  g0 = jax.jit(jax.grad(lambda p: jnp.sum(ref.apply(p, x).astype(jnp.float32) ** 2)))(p0)
  g1 = jax.jit(jax.grad(lambda p: jnp.sum(new.apply(p, x).astype(jnp.float32) ** 2)))(p0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert a.dtype == jnp.float32
    _assert_close(a, b, 5e-2 if jnp.bfloat16 in (dtype, in_dtype) else 1e-5)


def test_module_unbatched_input():
  conv = conv_lib.Conv(3, (3, 3), padding=1)
  x = jnp.asarray(np.random.default_rng(12).standard_normal((6, 5, 2)), jnp.float32)
  params = conv.init(jax.random.PRNGKey(1), x)
  y = conv.apply(params, x)
  assert y.shape == (6, 5, 3)
  _assert_close(y, conv.apply(params, x[None])[0], 1e-6)


def test_3x3_stride_1_padding_1_matches_lax():
  x, kernel = _inputs(13, 3, 6, 6, 4, 5, 3, jnp.float32)
  _assert_close(jax.jit(lambda a, b: conv_lib.conv2d(a, b, 1, 1))(x, kernel),
                _lax_conv(x, kernel, 1, ((1, 1), (1, 1))), 1e-5)


def test_rejects_bad_shapes():
  x, kernel = _inputs(14, 1, 5, 5, 3, 2, 3, jnp.float32)
  with pytest.raises(ValueError, match="rank 4"):
    conv_lib.conv2d(x[0], kernel)
  with pytest.raises(ValueError, match="input channels"):
    conv_lib.conv2d(x, kernel[:, :, :2])
  with pytest.raises(ValueError, match="negative"):
    conv_lib.conv2d(x, kernel, 1, ((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match="stride"):
    conv_lib.conv2d(x, kernel, (1, 2, 3))
  with pytest.raises(TypeError, match="kernel_size"):
    conv_lib.Conv(2, 3).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("k,stride", [(1, 2), (3, 1), (3, 2)])
def test_native_kernel_gradient_equals_per_tap(k, stride):
  """XLA's own kernel gradient (what the plain ``nn.Conv`` path takes) equals the per-tap one."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
  pads = conv_lib.normalize_padding((k - 1) // 2, (k, k), (stride, stride), (9, 8))
  out = conv_lib.conv2d(x, kernel, stride, (k - 1) // 2)
  ct = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  native = jax.jit(_native_kernel_grad, static_argnums=(3, 4))(
      x, ct, kernel, (stride, stride), pads)
  per_tap = jax.jit(conv_lib.kernel_grad, static_argnums=(2, 3, 4))(
      x, ct, (k, k), (stride, stride), pads)
  np.testing.assert_allclose(native, per_tap, rtol=1e-5, atol=1e-4)


def _native_kernel_grad(x, ct, kernel, strides, pads):
  """Autodiff's kernel gradient of XLA's convolution, float32 HWIO."""
  _, vjp_k = jax.vjp(lambda k: jax.lax.conv_general_dilated(
      x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")), kernel)
  return vjp_k(ct)[0].astype(jnp.float32)
