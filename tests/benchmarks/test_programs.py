"""The JAX side of the benchmarks builds, compiles and runs its programs (a tiny model stands in
for R50-FPN, whose compiles take minutes): the train step, ``predict`` on both inference paths,
and the per-module profile."""

from __future__ import annotations

import jax
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax.benchmarks import model_vs_torchvision as mvt
from mrcnn_jax.benchmarks import profiling
from mrcnn_jax.benchmarks import synthetic
from mrcnn_jax.modeling.config import tiny_model_config

pytestmark = pytest.mark.slow


def _tiny_config(height, width, batch, compute_dtype="float32"):
  config = config_lib.get_base_config()
  config.model = tiny_model_config(num_classes=4)
  config.model.compute_dtype = compute_dtype
  config.data.image_size = (height, width)
  config.data.max_instances = 8
  config.train.batch_size = batch
  return config


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
  monkeypatch.setattr(synthetic, "model_config", _tiny_config)
  monkeypatch.setattr(mvt, "TRAIN_SIZE", (128, 128))
  mvt._model_and_variables.cache_clear()  # pylint: disable=protected-access
  yield
  mvt._model_and_variables.cache_clear()  # pylint: disable=protected-access


def test_jax_train_compiles_and_steps():
  rows, logged = {}, []
  run = mvt.jax_train(rows, log=logged.append)
  run()
  assert set(rows) == {"train_compile", "init"}
  assert all(wall > 0 and cpu > 0 for wall, cpu in rows.values())
  assert logged and logged[0].startswith("JAX train metrics: {")


@pytest.mark.parametrize("prepare", [True, False])
def test_jax_infer_on_both_paths(prepare):
  rows = {}
  out = mvt.jax_infer(rows, "k", 64, 96, 64, 128, prepare=prepare)()
  assert out["boxes"].shape[0] == 1 and out["valid"].dtype == jax.numpy.bool_
  assert 0 <= rows["k_detections"] <= out["valid"].shape[-1]
  assert "k_compile" in rows and ("k_prepare" in rows) == prepare


def test_profile_model_adds_up_per_module():
  logged = []
  report = profiling.profile_model("predict", 128, 128, batch=1, runs=2, depth=1, top=3,
                                   log=logged.append)
  assert logged[0].startswith("compiled in") and logged[1].startswith("wall s, 3 runs")
  assert "| module | ms |" in report and "| total |" in report
  assert report.strip().splitlines()[-1].split()[0].replace(".", "").isdigit()
