"""The inference sweep on the tiny model: its points, files and the exported-artifact timing."""

from __future__ import annotations

import csv
import json

import numpy as np

from mrcnn_jax import config as config_lib
from mrcnn_jax.benchmarks import inference_sweep
from mrcnn_jax.inference import export
from mrcnn_jax.modeling.config import tiny_model_config


def _tiny(shape, dtype, batch):
  config = config_lib.get_base_config()
  config.model = tiny_model_config(num_classes=5)
  config.model.compute_dtype = dtype
  config.data.image_size = tuple(shape)
  return config


def test_sweep_points_and_files(tmp_path):
  options = inference_sweep.SweepOptions(batch_sizes=(1, 2), shapes=((128, 160),),
                                         dtypes=("float32",), repeats=3, warmup=1,
                                         hlo_dir=str(tmp_path / "hlo"), make_config=_tiny)
  results = inference_sweep.sweep(options, log=lambda _: None)
  points = results["points"]
  assert [(p["batch"], p["dtype"], p["height"], p["width"]) for p in points] == [
      (1, "float32", 128, 160), (2, "float32", 128, 160)]
  for p in points:
    assert p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"]
    assert p["images_per_s"] > 0 and p["flops"] > 0 and p["memory_bytes"] > 0
    # The second compile reads the persistent cache the first one wrote.
    assert 0 < p["compile_warm_s"] < p["compile_cold_s"]
    np.testing.assert_allclose(p["mfu"], p["flops"] / (p["p50_ms"] / 1e3)
                               / results["peak_flops"], rtol=1e-6)
  assert points[1]["flops"] > 1.8 * points[0]["flops"]
  assert sorted(f.name for f in (tmp_path / "hlo").iterdir()) == [
      "predict_128x160_float32_b1.hlo.txt", "predict_128x160_float32_b1.stablehlo.mlir",
      "predict_128x160_float32_b2.hlo.txt", "predict_128x160_float32_b2.stablehlo.mlir"]
  paths = inference_sweep.write(results, str(tmp_path / "out"))
  assert json.loads(open(paths[0]).read())["points"] == points
  with open(paths[1]) as f:
    assert len(list(csv.DictReader(f))) == 2
  assert open(paths[2], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_exported(tmp_path):
  config = _tiny((128, 128), "float32", 2)
  artifact = export.export_predict(config, export.random_variables(config), batch_size=2,
                                   platforms=("cpu",))
  export.save(artifact, str(tmp_path / "artifact"))
  result = inference_sweep.compare_exported(str(tmp_path / "artifact"), rounds=1, repeats=1,
                                            log=lambda _: None)
  assert (result["batch"], result["height"], result["width"]) == (2, 128, 128)
  assert result["exported_s"] > 0 and result["in_process_s"] > 0
  np.testing.assert_allclose(result["ratio"], result["exported_s"] / result["in_process_s"])
