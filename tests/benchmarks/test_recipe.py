"""The recipe-scale benchmark end to end on the tiny model, its peak table and FLOP count."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax.benchmarks import recipe
from mrcnn_jax.modeling.config import tiny_model_config


def _tiny(height, width):
  config = config_lib.get_base_config()
  config.model = tiny_model_config(num_classes=91)
  config.data.image_size = (height, width)
  config.data.max_instances = 8
  config.data.mask_size = 28
  return config


@pytest.mark.parametrize("kind,want", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12)])
def test_peak_flops_table(kind, want):
  device = types.SimpleNamespace(device_kind=kind, platform="gpu")
  assert recipe.peak_flops(device)[0] == want


def test_unknown_accelerator_has_no_peak():
  flops, source = recipe.peak_flops(types.SimpleNamespace(device_kind="Mystery", platform="gpu"))
  assert np.isnan(flops) and "Mystery" in source


def test_run_on_the_tiny_model():
  options = recipe.Options(height=128, width=160, train_batch=2, infer_batch=2, steps=2,
                           warmup=1, num_objects=3)
  out = recipe.run(options, log=lambda _: None, config=_tiny(128, 160))
  assert out["platform"] == jax.devices()[0].platform and out["peak_flops"] > 0
  for key, batch in (("train", 2 * jax.local_device_count()), ("predict", 2)):
    r = out[key]
    assert r["batch"] == batch and r["compile_s"] > 0 and r["flops_per_step"] > 0
    assert r["memory"]["total"] > 0 and r["hlo_ops"]
    step_s = r["step_ms"] / 1e3
    np.testing.assert_allclose(r["images_per_s_per_device"] * step_s * r["num_devices"], batch)
    np.testing.assert_allclose(r["mfu"], r["flops_per_step"] / step_s
                               / (out["peak_flops"] * r["num_devices"]))
  assert np.isfinite(out["train"]["total_loss"])


def test_train_flops_grow_with_the_batch_and_the_image():
  """XLA's count is of the program itself: twice the images, about twice the FLOPs."""
  one = recipe.train_step_flops(_with_batch(_tiny(128, 128), 1))
  two = recipe.train_step_flops(_with_batch(_tiny(128, 128), 2))
  larger = recipe.train_step_flops(_with_batch(_tiny(256, 256), 1))
  assert 1.8 < two / one < 2.2
  assert larger > 1.5 * one


def _with_batch(config, batch):
  config.train.batch_size = batch
  return config
