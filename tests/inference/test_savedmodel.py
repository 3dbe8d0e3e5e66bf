"""TF SavedModels of predict: ``serving_default`` loaded with ``tf.saved_model.load`` where JAX,
Flax and mrcnn_jax cannot be imported gives the in-process ``predict``'s detections; the
weights are variables; the CLI writes TF Serving's layout and refuses options it cannot honour."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

from mrcnn_jax.inference import export
from mrcnn_jax.inference import savedmodel
from tests.inference import export_case

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZE, BATCH = export_case.SIZE, export_case.BATCH
# XLA_FLAGS empty: the suite's fake-device flag is jaxlib's, not TensorFlow's XLA's.
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")

# A TF Serving stand-in: a fresh interpreter with TensorFlow only (JAX, Flax, mrcnn_jax blocked).
_TF_ONLY_RUN = """
import sys
for name in ("jax", "jaxlib", "flax", "mrcnn_jax"):
  sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
import tensorflow as tf
folder, inputs, out = sys.argv[1:4]
serve = tf.saved_model.load(folder).signatures["serving_default"]
x = np.load(inputs)
result = serve(images=tf.constant(x["images"]), valid_size=tf.constant(x["valid_size"]))
np.savez(out, **{k: v.numpy() for k, v in result.items()})
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  case = export_case.tiny_case()
  c, variables, ref = case["config"], case["variables"], case["ref"]
  images, valid_size = case["images"], case["valid_size"]
  out = tmp_path_factory.mktemp("savedmodel")
  artifact = savedmodel.export_savedmodel(c, variables, batch_size=BATCH,
                                          class_names=["square", "circle"], category_ids=[1, 7])
  folder = out / "shapes" / "1"
  absl_level = logging.getLogger("absl").level
  paths = savedmodel.save(artifact, str(folder))
  # TensorFlow's save pins absl's logger at WARNING; save() puts it back (else a later test,
  # or a user's training in the same process, logs nothing at INFO).
  assert logging.getLogger("absl").level == absl_level
  np.savez(out / "inputs.npz", images=images, valid_size=valid_size)
  proc = subprocess.run([sys.executable, "-c", _TF_ONLY_RUN, str(folder), str(out / "inputs.npz"),
                         str(out / "out.npz")], capture_output=True, text=True, env=ENV,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out / "out.npz") as f:
    served = {k: f[k] for k in f.files}
  return dict(config=c, variables=variables, ref=ref, served=served, folder=folder,
              paths=paths, artifact=artifact)


def test_served_signature_equals_in_process_predict(setup):
  """Classes and padding exactly; boxes, scores and masks to 1e-5: TensorFlow compiles the same
  StableHLO with its own XLA (an older one than jaxlib's), whose fusions round float32 sums
  differently (seen: 2e-6 px on boxes, 1e-6 on mask probabilities)."""
  ref, served = setup["ref"], setup["served"]
  assert sorted(served) == sorted(ref)
  for name, want in ref.items():
    got = served[name]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if name in ("classes", "valid"):
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_signature_is_the_static_uint8_batch(setup):
  serve = tf.saved_model.load(str(setup["folder"])).signatures[savedmodel.SIGNATURE]
  _, inputs = serve.structured_input_signature
  assert {k: (v.shape.as_list(), v.dtype) for k, v in inputs.items()} == {
      "images": ([BATCH, *SIZE, 3], tf.uint8), "valid_size": ([BATCH, 2], tf.int32)}
  d = setup["config"].model.detections_per_image
  outputs = {k: (v.shape.as_list(), v.dtype) for k, v in serve.structured_outputs.items()}
  assert outputs == {"boxes": ([BATCH, d, 4], tf.float32), "scores": ([BATCH, d], tf.float32),
                     "classes": ([BATCH, d], tf.int32), "masks": ([BATCH, d, 28, 28], tf.float32),
                     "valid": ([BATCH, d], tf.bool)}


def test_weights_are_variables_not_constants(setup):
  flat = export.flatten_variables(setup["variables"])
  loaded = tf.saved_model.load(str(setup["folder"]))
  assert len(loaded.params) == len(flat)
  for var, (name, value) in zip(loaded.params, flat.items()):
    np.testing.assert_array_equal(var.numpy(), value, err_msg=name)
  # Baked in, the weights would be in the graph: it would outweigh them.
  graph_bytes = (setup["folder"] / savedmodel.MODEL_FILE).stat().st_size
  assert graph_bytes < sum(v.nbytes for v in flat.values()) / 2


def test_sidecar(setup):
  side = savedmodel.read_sidecar(str(setup["folder"]))
  assert side == json.loads(pathlib.Path(setup["paths"]["sidecar"]).read_text())
  assert side["format"] == savedmodel.FORMAT and side["signature"] == "serving_default"
  assert side["platforms"] == ["cpu", "cuda", "tpu"] and side["weights"] == "variables"
  assert side["stablehlo_version"] == tf_stablehlo.get_current_version()
  assert side["exported_with"]["tensorflow"] == tf.__version__
  assert [l["name"] for l in side["weight_leaves"]] == list(
      export.flatten_variables(setup["variables"]))
  assert side["classes"][1] == {"index": 2, "name": "circle", "category_id": 7}
  assert [o["name"] for o in side["outputs"]] == ["boxes", "classes", "masks", "scores", "valid"]


def test_bad_stablehlo_version_and_existing_folder(setup):
  with pytest.raises(ValueError, match="stablehlo_version must be a version from"):
    savedmodel.target_stablehlo_version("1.x")
  with pytest.raises(ValueError, match="stablehlo_version must be a version from"):
    savedmodel.target_stablehlo_version("99.0.0")
  # StableHLO 0.9.0 predates the composite op jax lowers top_k to.
  with pytest.raises(ValueError, match="cannot be written for StableHLO 0.9.0"):
    savedmodel.serialize_for(setup["artifact"].module.exported, "0.9.0")
  with pytest.raises(ValueError, match="already holds saved_model.pb"):
    savedmodel.save(setup["artifact"], str(setup["folder"]))


def _run_script(*args):
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def test_script_writes_a_savedmodel(tmp_path):
  folder = tmp_path / "shapes" / "1"
  proc = _run_script("--config", "experiments/shapes.py", "--random_weights", "--format",
                     "savedmodel", "--height", "64", "--width", "96", "--platforms", "cpu,tpu",
                     "--paste_masks", "--out", str(folder))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (f"predict [1, 64, 96, 3] uint8 for cpu, tpu, weights variables, kernels plain -> "
          f"{folder} "
          "(savedmodel, sidecar)") in proc.stdout
  assert sorted(os.listdir(folder)) == ["assets", "assets.extra", "fingerprint.pb",
                                        "saved_model.pb", "variables"]
  side = savedmodel.read_sidecar(str(folder))
  assert (side["image_size"], side["platforms"], side["paste_masks"]) == ([64, 96],
                                                                         ["cpu", "tpu"], True)
  serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
  assert serve.structured_outputs["image_masks"].shape.as_list()[2:] == [64, 96]


@pytest.mark.parametrize("args, message", [
    (("--format=savedmodel", "--weights=baked"),
     "--weights is for --format=jax: a SavedModel holds its weights as variables"),
    (("--format=jax", "--stablehlo_version=1.13.7"),
     "--stablehlo_version is for --format=savedmodel"),
])
def test_script_refuses_an_option_the_format_cannot_honour(tmp_path, args, message):
  proc = _run_script("--config", "experiments/shapes.py", "--random_weights", *args, "--out",
                     str(tmp_path / "x"))
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"error: {message}", (
      proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
