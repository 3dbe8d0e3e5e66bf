"""kernels.compiler_options: on CPU, dots leave YNNPACK, results stay the same."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import inference
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.kernels import compiler
from mrcnn_jax.kernels import winograd

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def ynn_dots(hlo_text: str) -> int:
  """How many YNNPACK fusions of a compiled module contain a dot."""
  fused = re.findall(r"= \S+ fusion\([^\n]*calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo_text)
  bodies = dict(re.findall(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S))
  return sum(" dot(" in bodies.get(name, "") for name in fused)


def _batched_dot(a, b):
  return jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))


def test_cpu_dots_move_off_ynnpack_with_the_same_values():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((36, 64, 96)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((36, 96, 80)), jnp.float32)
  default = jax.jit(_batched_dot).lower(a, b).compile()
  options = kernels.compiler_options()
  assert options == {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE"}
  moved = jax.jit(_batched_dot, compiler_options=options).lower(a, b).compile()
  # The premise: this jaxlib gives dots to YNNPACK by default. Then: the options take them away.
  assert ynn_dots(default.as_text()) == 1
  assert ynn_dots(moved.as_text()) == 0
  want = np.einsum("pik,pkj->pij", np.asarray(a, np.float64), np.asarray(b, np.float64))
  np.testing.assert_allclose(moved(a, b), want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(moved(a, b), default(a, b), rtol=1e-5, atol=1e-4)


def test_winograd_conv_under_the_options_matches_xla_conv():
  """The Winograd batched matmul is what the options change (Eigen instead of YNNPACK)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 20, 20, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 32, 48)) / 17, jnp.float32)
  conv = jax.jit(winograd.conv3x3, compiler_options=kernels.compiler_options())
  assert ynn_dots(conv.lower(x, k).compile().as_text()) == 0
  want = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(conv(x, k), want, rtol=1e-4, atol=1e-4)


def test_other_backends_get_no_options():
  assert kernels.compiler_options("gpu") == {}
  assert kernels.compiler_options("tpu") == {}


def test_a_rejected_option_falls_back_to_the_defaults_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(compiler, "CPU_YNN_FUSION_TYPES", ("LIBRARY_FUSION_TYPE_NO_SUCH_TYPE",))
  compiler._cpu_options.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert kernels.compiler_options("cpu") == {}
    assert "does not accept" in caplog.text and "NO_SUCH_TYPE" in caplog.text
  finally:
    compiler._cpu_options.cache_clear()  # the next caller validates the real options again
  monkeypatch.undo()
  assert kernels.compiler_options("cpu")


def test_predictor_compiles_predict_without_ynnpack_dots():
  c = config_lib.get_base_config()
  c.data.image_size = (64, 64)
  c.model = modeling.tiny_model_config(num_classes=3)
  model = modeling.MaskRCNN(c.model, kernels=kernels.CPU)  # what the Predictor builds on CPU
  variables = modeling.init_variables(model, jax.random.PRNGKey(0), (64, 64))
  predictor = inference.Predictor(c, variables, score_threshold=0.0)
  args = (predictor.variables, jnp.zeros((1, 64, 64, 3), jnp.uint8),
          jnp.asarray([[64, 64]], jnp.int32))
  text = predictor._predict.lower(*args).compile().as_text()
  plain = jax.jit(lambda v, im, vs: model.apply(v, im, vs, method=modeling.MaskRCNN.predict))
  assert ynn_dots(plain.lower(*args).compile().as_text()) > 0  # the premise
  assert ynn_dots(text) == 0


def test_jit_predict_is_predict_under_the_options():
  model = modeling.MaskRCNN(modeling.tiny_model_config(num_classes=3), kernels=kernels.CPU)
  variables = modeling.init_variables(model, jax.random.PRNGKey(0), (64, 64))
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3)), jnp.uint8)
  predict = kernels.jit_predict(model)
  assert ynn_dots(predict.lower(variables, images).compile().as_text()) == 0
  want = model.apply(variables, images, method=modeling.MaskRCNN.predict)
  got = predict(variables, images)
  # Summation order differs, so near-tied detections of random weights may swap slots.
  assert int(got["valid"].sum()) == int(want["valid"].sum()) > 0
  np.testing.assert_allclose(np.sort(got["scores"][got["valid"]]),
                             np.sort(want["scores"][want["valid"]]), rtol=1e-4, atol=1e-5)
