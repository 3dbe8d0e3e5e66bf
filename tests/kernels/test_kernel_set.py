"""The kernel seam: ``kernels.select`` and what each kernel set compiles to.

The plain set is what a TPU or GPU compiles: lowered for them (``jax.export``, no device
needed), ``predict`` and the training gradient hold one XLA convolution per conv layer call and
no Winograd products; the CPU set lowered for CPU holds both Winograd products and fewer
convolutions (so the check can fail).
"""

from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from mrcnn_jax import config as config_lib
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.kernels import conv as conv_lib
from mrcnn_jax.run import sharding as sharding_lib

B, H, W = 2, 64, 96
# Winograd's tile-domain batch: (m + 2)^2 transformed positions for F(4x4) and F(5x5).
WINOGRAD_BATCHES = {36, 49}


def test_select():
  assert kernels.select("plain") is kernels.PLAIN
  assert kernels.select("cpu") is kernels.CPU
  want = kernels.CPU if jax.default_backend() == "cpu" else kernels.PLAIN
  assert kernels.select() is want
  mesh = sharding_lib.make_mesh(jax.devices()[:2])
  assert kernels.select("cpu", mesh=mesh) is kernels.CPU_SHARDED
  assert kernels.select("plain", mesh=mesh) is kernels.PLAIN
  assert config_lib.get_base_config().kernels == "auto"
  with pytest.raises(ValueError, match="kernels must be one of"):
    kernels.select("winograd")


def _model_and_args(kernel_set):
  model = modeling.MaskRCNN(modeling.tiny_model_config(), kernels=kernel_set)
  variables = jax.eval_shape(lambda k: modeling.init_variables(model, k, (H, W)),
                             jax.random.key(0))
  images = jax.ShapeDtypeStruct((B, H, W, 3), jnp.uint8)
  return model, variables, images


def _num_conv_layers(variables) -> int:
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  return sum(1 for k, v in flat.items() if k.endswith("kernel") and len(v.shape) == 4)


def _stats(mlir_text: str):
  convs = mlir_text.count("stablehlo.convolution")
  batched = [int(m) for m in re.findall(
      r"stablehlo\.dot_general[^\n]*batching_dims[^\n]*?:\s*\(tensor<(\d+)x", mlir_text)]
  return convs, sum(b in WINOGRAD_BATCHES for b in batched)


def _lowered(kernel_set, platform, what):
  model, variables, images = _model_and_args(kernel_set)
  if what == "predict":
    fn = lambda v, x: model.apply(v, x, method=modeling.MaskRCNN.predict)  # noqa: E731
    args = (variables, images)
  else:
    batch = dict(image=images, gt_boxes=jax.ShapeDtypeStruct((B, 4, 4), jnp.float32),
                 gt_classes=jax.ShapeDtypeStruct((B, 4), jnp.int32),
                 gt_masks=jax.ShapeDtypeStruct((B, 4, 16, 16), jnp.uint8),
                 gt_valid=jax.ShapeDtypeStruct((B, 4), jnp.bool_))
    # The training gradient (the train step's expensive part), kernel gradients included.
    fn = jax.grad(lambda p, b: sum(model.apply(
        {"params": p}, b, method=modeling.MaskRCNN.losses,
        rngs={"sampling": jax.random.key(1)})[0].values()))
    args = (variables["params"], batch)
  exported = export.export(jax.jit(fn), platforms=(platform,))(*args)
  return exported.mlir_module(), _num_conv_layers(variables)


@pytest.mark.parametrize("what", ["predict", "grad"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_plain_kernels_lower_to_xla_convolutions_for_accelerators(platform, what):
  text, layers = _lowered(kernels.PLAIN, platform, what)
  convs, winograd_dots = _stats(text)
  # Every conv layer is an XLA convolution (the shared RPN conv and the gradients add more).
  assert convs >= layers, (convs, layers)
  assert winograd_dots == 0


def test_cpu_kernels_lower_to_winograd_and_matmuls_for_cpu():
  text, layers = _lowered(kernels.CPU, "cpu", "predict")
  convs, winograd_dots = _stats(text)
  assert winograd_dots > 0
  assert convs < layers, (convs, layers)  # 1x1 convs and Winograd 3x3 convs are matmuls


def test_kernel_set_is_a_model_attribute_not_a_global():
  """Two models built side by side trace their own algorithms."""
  plain, cpu = (_lowered(ks, "cpu", "predict")[0] for ks in (kernels.PLAIN, kernels.CPU))
  assert _stats(plain)[1] == 0 < _stats(cpu)[1]
  assert conv_lib.TRANSFORMED_KERNELS in kernels.CPU.inference_collections
  assert not kernels.PLAIN.inference_collections
  np.testing.assert_equal(kernels.PLAIN.pool_rois, None)
