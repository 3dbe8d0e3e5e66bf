"""Prediction, evaluation, weight conversion and export with their paths in a bucket (the
Cloud Storage emulator of the ``gcs`` fixture): the same files as with local paths, and a
missing bucket or a refused permission as one line naming the path, before any compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from etils import epath
from PIL import Image

from mrcnn_jax import inference
from mrcnn_jax import modeling
from mrcnn_jax.convert import common
from mrcnn_jax.evaluation import evaluator
from mrcnn_jax.inference import export
from mrcnn_jax.inference import predictor as predictor_lib
from mrcnn_jax.inference import savedmodel
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.run import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = "64,64"
IMAGES = (("a.png", (40, 56)), ("b.png", (64, 48)), ("c.png", (30, 30)))  # name, (h, w)


def _run(gcs, script: str, *args: str) -> subprocess.CompletedProcess:
  """``scripts/<script>`` in a subprocess pointed at the emulator."""
  env = dict(gcs.subprocess_env(), XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _error_line(proc: subprocess.CompletedProcess) -> str:
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


def _random_variables(config) -> dict:
  """Variables of the model's shapes, drawn with numpy: no init program to compile (it takes
  longer than everything else here). Kernels N(0, 1 / fan_in), norms the identity."""
  shapes = jax.eval_shape(lambda k: modeling.init_variables(modeling.MaskRCNN(config), k,
                                                            (64, 64)), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ("kernel",):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """The untrained tiny model converted into a local folder (its ``config.py`` and
  weights)."""
  config = tiny_model_config(num_classes=3)
  variables = _random_variables(config)
  local = str(tmp_path_factory.mktemp("converted"))
  common.save_converted(variables, config, local)
  return dict(config=config, variables=variables, local=local)


@pytest.fixture(scope="module")
def images(gcs, tmp_path_factory):
  """Three PNGs of several sizes, in a local folder and in ``<bucket>/images`` (with a
  sub-folder and a text file that are not images)."""
  local = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, (h, w) in IMAGES:
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(local / name)
  bucket = gcs.new_bucket("images")
  for name in sorted(os.listdir(local)):
    tf.io.gfile.copy(str(local / name), f"{bucket}/images/{name}")
  tf.io.gfile.copy(str(local / "a.png"), f"{bucket}/images/sub/d.png")
  epath.Path(f"{bucket}/images/notes.txt").write_text("not an image")
  return dict(local=str(local), bucket=bucket, url=f"{bucket}/images")


def test_expand_image_paths_in_a_bucket(images):
  url = images["url"]
  expected = [f"{url}/{n}" for n in ("a.png", "b.png", "c.png")]
  assert inference.expand_image_paths(url) == expected  # a folder: its images, not sub/
  assert inference.expand_image_paths(url + "/") == expected
  assert inference.expand_image_paths(f"{url}/*.png") == expected
  assert inference.expand_image_paths(f"{url}/*/*.png") == [f"{url}/sub/d.png"]
  assert inference.expand_image_paths(f"{url}/b.png") == [f"{url}/b.png"]
  with pytest.raises(FileNotFoundError, match="no image found"):
    inference.expand_image_paths(f"{url}/*.jpg")


@pytest.mark.parametrize("spec,error,message", [
    ("gs://missing-bucket-x/images/*.png", FileNotFoundError,
     "--images: bucket gs://missing-bucket-x does not exist"),
    ("gs://no-access-x/images/*.png", PermissionError,
     "--images: no permission for gs://no-access-x/images"),
])
def test_images_in_a_missing_or_forbidden_bucket_are_one_line(gcs, spec, error, message):
  with pytest.raises(error, match=message) as e:
    inference.expand_image_paths(spec)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("out,error,message", [
    ("gs://missing-bucket-x/out", FileNotFoundError,
     "--out: bucket gs://missing-bucket-x does not exist"),
    ("gs://no-access-x/out", PermissionError, "--out: no permission for gs://no-access-x/out"),
])
def test_out_in_a_missing_or_forbidden_bucket_is_one_line(gcs, out, error, message):
  for check in (predictor_lib.check_out_dir, export.check_out_dir):
    with pytest.raises(error, match=message) as e:
      check(out)
    assert "\n" not in str(e.value)


def test_predict_script_reads_and_writes_a_bucket(gcs, model, images, tmp_path):
  """predict.py with --images and --out in a bucket writes what it writes locally."""
  config = os.path.join(model["local"], common.EXPERIMENT_FILE) + ":" + SIZE
  common_args = ("--config", config, "--checkpoint", model["local"], "--score_threshold", "0")
  out_url = gcs.new_bucket("predictions") + "/run/out"
  local_out = str(tmp_path / "out")
  for images_arg, out in ((images["local"], local_out), (f"{images['url']}/*.png", out_url)):
    proc = _run(gcs, "predict.py", *common_args, "--images", images_arg, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
  local_results = json.loads(epath.Path(local_out, "results.json").read_text())
  url_results = json.loads(epath.Path(out_url + "/results.json").read_text())
  assert url_results == local_results
  assert local_results["complete"] and len(local_results["detections"]) > 0
  overlays = sorted(n for n in os.listdir(local_out) if n != "results.json")
  assert overlays == ["0000_a.png", "0001_b.png", "0002_c.png"]
  assert sorted(tf.io.gfile.listdir(out_url)) == sorted(overlays + ["results.json"])
  for name in overlays:
    assert epath.Path(f"{out_url}/{name}").read_bytes() == epath.Path(local_out, name).read_bytes()

  # The bucket folder now holds a run's results: refused (before the model loads).
  with pytest.raises(ValueError, match=r"holds another run's results \(results.json and 3 "
                     r"overlays\)"):
    predictor_lib.check_out_dir(out_url)


@pytest.fixture(scope="module")
def converted_url(gcs, model):
  """The tiny model converted into a bucket folder: ``(folder, step folder returned)``."""
  url = gcs.new_bucket("converted") + "/tiny"
  return url, common.save_converted(model["variables"], model["config"], url)


def test_converted_weights_in_a_bucket(model, converted_url):
  """save_converted to a bucket; load_converted, experiment_config, the checkpoint loader and
  the written config.py read it back."""
  url, step = converted_url
  assert step == f"{url}/checkpoints/0"
  variables, config = common.load_converted(url)
  assert config.to_dict() == model["config"].to_dict()
  expected = jax.tree_util.tree_leaves_with_path(model["variables"])
  got = dict(jax.tree_util.tree_leaves_with_path(variables))
  assert len(got) == len(expected)
  for k, v in expected:
    np.testing.assert_array_equal(got[k], v)
  experiment = common.experiment_config(url, SIZE)
  assert experiment.init_weights == url and experiment.model.to_dict() == config.to_dict()
  params = ckpt_lib.load_params(url)  # config.init_weights=gs://... and --checkpoint gs://...
  np.testing.assert_array_equal(params["backbone/conv1/kernel"],
                                model["variables"]["params"]["backbone"]["conv1"]["kernel"])
  # Its config.py names the bucket folder, so a local copy of it is a --config.
  text = epath.Path(f"{url}/{common.EXPERIMENT_FILE}").read_text()
  namespace = {}
  exec(compile(text, "converted_config.py", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["get_config"](SIZE).init_weights == url


def test_weight_files_read_from_a_bucket(gcs, tmp_path):
  """The converters' readers take a .pth / .pkl in a bucket as they take a local one."""
  import pickle  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.convert import detectron2  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.convert import torchvision  # pylint: disable=g-import-not-at-top
  bucket = gcs.new_bucket("weights")
  torch.save({"model": {"backbone.body.conv1.weight": torch.arange(6.0).reshape(2, 3)}},
             tmp_path / "w.pth")
  (tmp_path / "w.pkl").write_bytes(pickle.dumps({"model": {"backbone.x": np.ones(3)}}))
  for name, read in (("w.pth", torchvision.load_torch_state_dict),
                     ("w.pkl", detectron2.load_detectron2_pkl)):
    tf.io.gfile.copy(str(tmp_path / name), f"{bucket}/{name}")
    local, url = read(str(tmp_path / name)), read(f"{bucket}/{name}")
    assert local.keys() == url.keys() and len(local) == 1
    for k, v in local.items():
      np.testing.assert_array_equal(url[k], v)
  with pytest.raises(PermissionError, match="weight file: no permission for gs://no-access-x/"):
    torchvision.load_torch_state_dict("gs://no-access-x/w.pth")


def test_convert_output_in_a_missing_or_forbidden_bucket_is_one_line(gcs, model, tmp_path):
  (tmp_path / "model.pth").write_bytes(b"checked for existence only")
  proc = _run(gcs, "convert_weights.py", "--source", "torchvision", "--input",
              str(tmp_path / "model.pth"), "--output", "gs://missing-bucket-x/conv")
  assert _error_line(proc) == ("error: --output: bucket gs://missing-bucket-x does not exist "
                               "(gs://missing-bucket-x/conv)")
  with pytest.raises(PermissionError, match="output folder: no permission for "
                     "gs://no-access-x/conv") as e:
    common.save_converted(model["variables"], model["config"], "gs://no-access-x/conv")
  assert "\n" not in str(e.value)


def test_evaluate_script_with_checkpoint_and_workdir_in_a_bucket(gcs, model, images,
                                                                converted_url, tmp_path):
  """evaluate.py --checkpoint gs://... --workdir gs://...: the metrics and detections JSON land
  in the bucket (the data set is local)."""
  coco = {"images": [], "annotations": [],
          "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]}
  for i, (name, (h, w)) in enumerate(IMAGES, start=1):
    x0, y0, x1, y1 = 4.0, 6.0, w - 5.0, h - 3.0
    coco["images"].append({"id": i, "file_name": name, "height": h, "width": w})
    coco["annotations"].append({
        "id": i, "image_id": i, "category_id": 1 + i % 2, "iscrowd": 0,
        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
  (tmp_path / "instances.json").write_text(json.dumps(coco))
  workdir = gcs.new_bucket("eval") + "/run"
  proc = _run(gcs, "evaluate.py", "--config", os.path.join(model["local"],
                                                          common.EXPERIMENT_FILE) + ":" + SIZE,
              f"--config.data.eval_annotations={tmp_path / 'instances.json'}",
              f"--config.data.eval_images={images['local']}", "--workdir", workdir,
              "--checkpoint", converted_url[0])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "evaluated 3 of 3 images" in proc.stdout, proc.stdout
  names = sorted(tf.io.gfile.listdir(f"{workdir}/eval"))
  assert len(names) == 2 and names[0].startswith("detections_"), names
  metrics = json.loads(epath.Path(f"{workdir}/eval/{names[1]}").read_text())
  assert metrics["data"]["images_evaluated"] == 3 and "AP" in metrics["bbox"], metrics


def test_eval_results_written_to_a_bucket(gcs):
  workdir = gcs.new_bucket("eval") + "/run"
  records = [{"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
  path = evaluator.save_results(workdir, {"bbox": {"AP": 0.25}, "images": [1]}, records, 12)
  assert path == f"{workdir}/eval/metrics_00000012.json"
  assert json.loads(epath.Path(path).read_text()) == {"bbox": {"AP": 0.25}, "step": 12}
  detections = epath.Path(f"{workdir}/eval/detections_00000012.json").read_text()
  assert json.loads(detections) == records


@pytest.mark.parametrize("workdir,error,message", [
    ("gs://missing-bucket-x/run", FileNotFoundError,
     "checkpoint: bucket gs://missing-bucket-x does not exist"),
    ("gs://no-access-x/run", PermissionError, "checkpoint: no permission for gs://no-access-x/run"),
])
def test_evaluate_checkpoint_in_a_missing_or_forbidden_bucket_is_one_line(
    gcs, model, images, tmp_path, workdir, error, message):
  config = common.experiment_config(model["local"], SIZE)
  (tmp_path / "instances.json").write_text('{"images": [], "annotations": [], "categories": []}')
  config.data.eval_annotations = str(tmp_path / "instances.json")
  config.data.eval_images = images["local"]
  with pytest.raises(error, match=message) as e:
    evaluator.evaluate_checkpoint(config, workdir, workdir)
  assert "\n" not in str(e.value)


def test_export_to_a_bucket(gcs, model, tmp_path):
  """A jax.export artifact with argument weights saved to a bucket: the same files as saved
  locally; a SavedModel saved there is one TensorFlow loads from it."""
  config = common.experiment_config(model["local"], SIZE)
  artifact = export.export_predict(config, model["variables"], batch_size=1,
                                   platforms=("cpu",), weights="argument")
  url = gcs.new_bucket("export") + "/predict/1"
  written = export.save(artifact, url)
  local = export.save(artifact, str(tmp_path / "local"))
  assert set(written) == set(local) == {"artifact", "sidecar", "loader", "weights"}
  for key, path in written.items():
    assert path.startswith(url + "/")
    assert epath.Path(path).read_bytes() == epath.Path(local[key]).read_bytes(), key
  with pytest.raises(ValueError, match="already holds"):
    export.check_out_dir(url)

  url = gcs.new_bucket("savedmodel") + "/maskrcnn/1"
  savedmodel.save(savedmodel.export_savedmodel(config, model["variables"], batch_size=1), url)
  assert savedmodel.read_sidecar(url)["signature"] == savedmodel.SIGNATURE
  assert savedmodel.SIGNATURE in tf.saved_model.load(url).signatures
  with pytest.raises(ValueError, match="already holds"):
    savedmodel.check_out_dir(url)
