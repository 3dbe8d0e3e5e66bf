"""jax.export artifacts: lowered for cpu, cuda and tpu, loaded with jax + numpy only, equal to
the in-process ``predict``; the loader refuses wrong inputs and weights in one line."""

from __future__ import annotations

import ast
import copy
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.inference import export
from mrcnn_jax.inference import exported as exported_lib
from mrcnn_jax.ops import masks as masks_ops
from tests.inference import export_case

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZE, BATCH = export_case.SIZE, export_case.BATCH

# Runs in a fresh interpreter where Flax, TensorFlow, ml_collections, orbax and mrcnn_jax cannot
# be imported: the loader copied next to each artifact must do with jax and numpy.
_BLOCKED_RUN = """
import sys
for name in ("flax", "tensorflow", "ml_collections", "orbax", "optax", "mrcnn_jax"):
  sys.modules[name] = None  # `import name` now raises ImportError
baked, argument, inputs, out = sys.argv[1:5]
sys.path.insert(0, baked)
import exported  # the copy in the artifact folder
import numpy as np
x = np.load(inputs)
results = {}
for tag, folder in (("baked", baked), ("argument", argument)):
  predict = exported.load(folder)  # the argument artifact finds its weights.npz
  for k, v in predict(x["images"], x["valid_size"]).items():
    results[f"{tag}/{k}"] = np.asarray(v)
np.savez(out, **results)
print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "mrcnn_jax")
                                                  and sys.modules[m] is not None))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  case = export_case.tiny_case()  # the in-process predict: the plain-kernel model, jitted
  c, variables, predict, ref = case["config"], case["variables"], case["predict"], case["ref"]
  images, valid_size = case["images"], case["valid_size"]
  # With the weights closed over, as baked: XLA folds constant weights (frozen BatchNorm into
  # the conv kernels, ...), so this program rounds a few values differently from ``ref``.
  ref_baked = jax.device_get(jax.jit(lambda im, vs: predict(variables, im, vs))(images,
                                                                                valid_size))
  out = tmp_path_factory.mktemp("export")
  baked = export.export_predict(c, variables, batch_size=BATCH, class_names=["square", "circle"],
                                category_ids=[1, 7])
  argument = export.export_predict(c, variables, batch_size=BATCH, weights="argument",
                                   paste_masks=True)
  dirs = {"baked": out / "baked", "argument": out / "argument"}
  export.save(baked, str(dirs["baked"]))
  export.save(argument, str(dirs["argument"]))
  np.savez(out / "inputs.npz", images=images, valid_size=valid_size)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(dirs["baked"]),
                         str(dirs["argument"]), str(out / "inputs.npz"), str(out / "out.npz")],
                        capture_output=True, text=True, env=env, timeout=300, cwd=out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out / "out.npz") as f:
    loaded = {k: f[k] for k in f.files}
  return dict(config=c, variables=variables, images=images, valid_size=valid_size, ref=ref,
              ref_baked=ref_baked,
              dirs=dirs, loaded=loaded, stdout=proc.stdout, artifacts={"baked": baked,
                                                                      "argument": argument})


@pytest.mark.parametrize("mode", ["baked", "argument"])
def test_loaded_artifact_equals_in_process_predict(setup, mode):
  """Bit for bit, detections, masks and padding rows: the artifact is the StableHLO of the
  in-process program (weights closed over for ``baked``), compiled by the same XLA:CPU."""
  assert "modules: []" in setup["stdout"]
  ref = setup["ref_baked" if mode == "baked" else "ref"]
  for name, want in ref.items():
    got = setup["loaded"][f"{mode}/{name}"]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=f"{mode}/{name}")


def test_baked_weights_match_predict_to_float_rounding(setup):
  """Baked weights are constants XLA folds, so boxes and scores differ from the weights-as-
  argument ``predict`` by float32 rounding only (~1e-7 relative), in the same order."""
  ref = setup["ref"]
  for name in ("classes", "valid"):
    np.testing.assert_array_equal(setup["loaded"][f"baked/{name}"], ref[name], err_msg=name)
  for name in ("boxes", "scores", "masks"):
    np.testing.assert_allclose(setup["loaded"][f"baked/{name}"], ref[name], rtol=1e-5,
                               atol=1e-5, err_msg=name)


def test_pasted_masks_equal_ops_paste_masks(setup):
  ref = setup["ref"]
  got = setup["loaded"]["argument/image_masks"]
  assert got.shape == (BATCH, ref["masks"].shape[1]) + SIZE
  for i in range(BATCH):
    want = np.asarray(masks_ops.paste_masks(ref["masks"][i], ref["boxes"][i], SIZE))
    # paste_masks alone vs fused into the program: float32 rounding may differ by an ulp.
    np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-6)
  assert got[ref["valid"]].max() > 0.0 and got[~ref["valid"]].max(initial=0.0) == 0.0


def test_sidecar(setup):
  side = json.loads((setup["dirs"]["baked"] / exported_lib.SIDECAR_FILE).read_text())
  assert side["format"] == exported_lib.FORMAT
  assert side["platforms"] == ["cpu", "cuda", "tpu"]
  assert side["exported_with"]["jax"] == jax.__version__
  assert side["exported_with"]["mrcnn_jax"] and side["exported_at"]
  assert side["inputs"][0] == {"name": "images", "shape": [BATCH, *SIZE, 3], "dtype": "uint8",
                               "doc": side["inputs"][0]["doc"]}
  assert [(i["name"], i["shape"], i["dtype"]) for i in side["inputs"]][1] == (
      "valid_size", [BATCH, 2], "int32")
  d = setup["config"].model.detections_per_image
  outputs = {o["name"]: (o["shape"], o["dtype"]) for o in side["outputs"]}
  assert outputs == {"boxes": ([BATCH, d, 4], "float32"), "scores": ([BATCH, d], "float32"),
                     "classes": ([BATCH, d], "int32"), "masks": ([BATCH, d, 28, 28], "float32"),
                     "valid": ([BATCH, d], "bool")}
  assert side["classes"] == [{"index": 1, "name": "square", "category_id": 1},
                             {"index": 2, "name": "circle", "category_id": 7}]
  assert side["score_threshold"] == setup["config"].model.roi.score_threshold
  assert side["weights"] == "baked" and side["weight_leaves"] == []
  assert not (setup["dirs"]["baked"] / exported_lib.WEIGHTS_FILE).exists()

  arg = json.loads((setup["dirs"]["argument"] / exported_lib.SIDECAR_FILE).read_text())
  flat = export.flatten_variables(setup["variables"])
  assert [l["name"] for l in arg["weight_leaves"]] == list(flat)
  assert all(l["shape"] == list(flat[l["name"]].shape) for l in arg["weight_leaves"])
  assert arg["paste_masks"] and {"image_masks"} < {o["name"] for o in arg["outputs"]}
  with np.load(setup["dirs"]["argument"] / exported_lib.WEIGHTS_FILE) as f:
    assert sorted(f.files) == sorted(flat)


def test_loader_imports_only_jax_and_numpy():
  tree = ast.parse(pathlib.Path(exported_lib.__file__).read_text())
  roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
           for a in n.names}
  roots |= {n.module.split(".")[0] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module}
  assert roots - {"__future__", "json", "os", "typing"} == {"jax", "numpy"}


@pytest.mark.parametrize("images, valid_size, message", [
    (np.zeros((1, 64, 64, 3), np.uint8), None,
     "images must be [2, 64, 64, 3] uint8 (the exported shape), got [1, 64, 64, 3] uint8"),
    (np.zeros((2, 64, 64, 3), np.float32), None,
     "images must be [2, 64, 64, 3] uint8 (the exported shape), got [2, 64, 64, 3] float32"),
    (np.zeros((2, 64, 64, 3), np.uint8), np.zeros((2, 2), np.int64),
     "valid_size must be [2, 2] int32 (the exported shape), got [2, 2] int64"),
])
def test_wrong_input_is_a_one_line_value_error(setup, images, valid_size, message):
  predict = exported_lib.load(str(setup["dirs"]["baked"]))
  with pytest.raises(ValueError) as e:
    predict(images, valid_size)
  assert str(e.value) == message


def test_wrong_or_missing_weights_are_refused(setup):
  folder = str(setup["dirs"]["argument"])
  flat = export.flatten_variables(setup["variables"])
  name = next(iter(flat))
  with pytest.raises(ValueError, match=f"weight {name} must be"):
    exported_lib.load(folder, weights={**flat, name: flat[name][..., :1]})
  with pytest.raises(ValueError, match="1 missing"):
    exported_lib.load(folder, weights={k: v for k, v in flat.items() if k != name})
  side = exported_lib.read_sidecar(folder)
  serialized = (setup["dirs"]["argument"] / exported_lib.ARTIFACT_FILE).read_bytes()
  with pytest.raises(ValueError, match="takes its weights as an argument"):
    exported_lib.ExportedPredict(serialized, side)
  with pytest.raises(ValueError, match="baked in"):
    exported_lib.load(str(setup["dirs"]["baked"]), weights=flat)


def test_bad_export_options(setup):
  c, v = setup["config"], setup["variables"]
  with pytest.raises(ValueError, match="platform must be one of"):
    export.export_predict(c, v, batch_size=1, platforms=("cpu", "gpu"))
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    export.export_predict(c, v, batch_size=0)
  with pytest.raises(ValueError, match="weights must be one of"):
    export.export_predict(c, v, batch_size=1, weights="both")
  with pytest.raises(ValueError, match="already holds predict.jax"):
    export.save(setup["artifacts"]["baked"], str(setup["dirs"]["baked"]))
  pose = copy.deepcopy(c)
  pose.model.mask.enabled, pose.model.keypoint.enabled = False, True
  with pytest.raises(ValueError, match="paste_masks needs the mask branch"):
    export.export_predict(pose, v, batch_size=1, paste_masks=True)


def test_a_platform_that_does_not_lower_is_named(setup, monkeypatch):
  real = export.jax_export.export

  def export_without_tpu(fn, platforms):  # as if some op had no TPU lowering
    if "tpu" in platforms:
      raise NotImplementedError("no lowering for some_op on tpu")
    return real(fn, platforms=platforms)

  monkeypatch.setattr(export.jax_export, "export", export_without_tpu)
  with pytest.raises(ValueError, match=r"does not lower for tpu \(no lowering for some_op"):
    export.export_predict(setup["config"], setup["variables"], batch_size=1)
  with pytest.raises(NotImplementedError):  # the only platform asked for: the error as it is
    export.export_predict(setup["config"], setup["variables"], batch_size=1, platforms=("tpu",))


def _run_script(*args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_script_bad_platform_is_one_line(tmp_path):
  proc = _run_script("--config", "experiments/shapes.py", "--random_weights",
                     "--platforms=cpu,gpu", "--out", str(tmp_path / "x"))
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
  assert "platform must be one of cpu, cuda, rocm, tpu, got 'gpu'" in errors[0]
  assert "Traceback" not in proc.stderr


def test_script_exports_random_then_checkpoint_weights(tmp_path):
  """--random_weights with --weights=argument, then the same weights as a --checkpoint weights
  file: the second artifact's weights.npz holds what the checkpoint held."""
  first, second = tmp_path / "random", tmp_path / "from_checkpoint"
  common = ("--config", "experiments/shapes.py", "--height", "64", "--width", "96",
            "--weights", "argument", "--platforms", "cpu,tpu")
  proc = _run_script(*common, "--random_weights", "--paste_masks", "--compute_dtype",
                     "bfloat16", "--out", str(first))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (f"predict [1, 64, 96, 3] uint8 for cpu, tpu, weights argument, kernels plain -> {first}"
          in proc.stdout)
  side = exported_lib.read_sidecar(str(first))
  assert (side["image_size"], side["compute_dtype"], side["paste_masks"]) == (
      [64, 96], "bfloat16", True)
  assert sorted(os.listdir(first)) == ["exported.py", "predict.jax", "predict.json",
                                       "weights.npz"]
  with np.load(first / "weights.npz") as f:
    weights = {k: f[k] for k in f.files}
  # A weights file as run.checkpoint.load_params reads it: parameter paths without 'params/'.
  np.savez(tmp_path / "params.npz", **{k[len("params/"):]: v for k, v in weights.items()})
  proc = _run_script(*common, "--checkpoint", str(tmp_path / "params.npz"), "--out", str(second))
  assert proc.returncode == 0, proc.stderr[-2000:]
  with np.load(second / "weights.npz") as f:
    assert sorted(f.files) == sorted(weights)
    for k, v in weights.items():
      np.testing.assert_array_equal(f[k], v, err_msg=k)
  proc = _run_script(*common, "--random_weights", "--out", str(first))
  assert proc.returncode == 1 and "pass --overwrite" in proc.stderr.splitlines()[-1]


def test_cpu_only_artifact_runs_the_cpu_kernels_as_predict_does(setup, tmp_path):
  """A CPU-only artifact with baked weights is the in-process CPU predict: the CPU kernels,
  their precomputed transforms baked in, compiled with the same XLA:CPU options."""
  c, variables = setup["config"], setup["variables"]
  artifact = export.export_predict(c, variables, batch_size=BATCH, platforms=("cpu",))
  assert artifact.sidecar["kernels"] == "cpu"
  assert artifact.sidecar["compiler_options"] == {"cpu": kernels.compiler_options("cpu")}
  export.save(artifact, str(tmp_path / "cpu"))
  got = jax.device_get(exported_lib.load(str(tmp_path / "cpu"))(setup["images"],
                                                             setup["valid_size"]))
  model = modeling.MaskRCNN(c.model, kernels=kernels.select("cpu"))
  prepared = kernels.prepare_inference(model, variables, SIZE, BATCH)
  fn = jax.jit(lambda im, vs: model.apply(prepared, im, vs, method=modeling.MaskRCNN.predict),
               compiler_options=kernels.compiler_options("cpu"))
  want = jax.device_get(fn(setup["images"], setup["valid_size"]))
  for name in ("classes", "valid"):
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name in ("boxes", "scores", "masks"):  # constants folded as in the baked case above
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
  # Portable artifacts keep the plain kernels; the CPU ones are refused where they do not fit.
  assert export.resolve_kernels("auto", ("cpu", "cuda"), "baked") == "plain"
  assert export.resolve_kernels("auto", ("cpu",), "argument") == "plain"
  with pytest.raises(ValueError, match="kernels='cpu' needs"):
    export.resolve_kernels("cpu", ("cpu", "tpu"), "baked")
