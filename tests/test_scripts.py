"""The entry points from a shell: a bad flag or a missing path is one clear line, exit != 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
  return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


@pytest.mark.parametrize("args,expected", [
    (["--config", "experiments/shapes.py", "--workdir", "w", "--bogus_flag=1"],
     "Unknown command line flag 'bogus_flag'"),
    (["--config", "experiments/shapes.py"], "--workdir"),
    (["--config", "experiments/shapes.py", "--workdir", "w", "--config.train.no_such_field=3"],
     "no_such_field"),
    (["--config", "experiments/no_such_experiment.py", "--workdir", "w"],
     "No such file or directory"),
])
def test_bad_flag_is_one_line(args, expected):
  proc = run_script("train.py", *args)
  assert proc.returncode != 0
  errors = error_lines(proc)
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_missing_data_path_is_one_line(tmp_path):
  missing = str(tmp_path / "nowhere" / "instances_train.json")
  proc = run_script("train.py", "--config", "experiments/shapes.py", "--workdir",
                    str(tmp_path / "w"), f"--config.data.train_annotations={missing}")
  assert proc.returncode == 1
  assert error_lines(proc) == [f"error: config.data.train_annotations not found: {missing}"]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_predict_missing_images_is_one_line(tmp_path):
  proc = run_script("predict.py", "--config", "experiments/shapes.py", "--workdir",
                    str(tmp_path), "--images", str(tmp_path / "*.png"), "--out",
                    str(tmp_path / "out"))
  assert proc.returncode == 1
  errors = error_lines(proc)
  assert len(errors) == 1 and "no image found" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_main_job_refuses_data_path_overrides(tmp_path):
  """main_job.py sets the data paths from --data_dir; an override would be silently replaced."""
  proc = run_script("main_job.py", "--workdir", str(tmp_path / "w"), "--data_dir",
                    str(tmp_path / "d"), "--config.data.train_images=/my/images")
  assert proc.returncode == 1
  errors = error_lines(proc)
  assert len(errors) == 1 and "config.data.train_images" in errors[0], proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "d"), "refused before generating anything"


@pytest.mark.slow
def test_predict_exits_1_when_no_image_can_be_read(tmp_path):
  """Every image unreadable: results.json lists them, and the exit status says it failed."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mrcnn_jax import modeling  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.config import load_config_file  # pylint: disable=g-import-not-at-top
  config = load_config_file(os.path.join(ROOT, "experiments", "shapes.py"))
  variables = modeling.init_variables(modeling.MaskRCNN(config.model), jax.random.PRNGKey(0),
                                      tuple(config.data.image_size))
  weights = tmp_path / "weights.npz"
  np.savez(weights, **flax.traverse_util.flatten_dict(variables["params"], sep="/"))
  (tmp_path / "broken.png").write_bytes(b"not a png")
  proc = run_script("predict.py", "--config", "experiments/shapes.py", "--checkpoint",
                    str(weights), "--images", str(tmp_path / "broken.png"),
                    "--out", str(tmp_path / "out"))
  assert proc.returncode == 1, proc.stderr[-2000:]
  errors = error_lines(proc)
  assert len(errors) == 1 and "none of the 1 images could be read" in errors[0], errors
  assert os.path.exists(tmp_path / "out" / "results.json")


def test_predict_out_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "a.png").write_bytes(b"x")
  (tmp_path / "out").write_text("a file")
  proc = run_script("predict.py", "--config", "experiments/shapes.py", "--workdir", str(tmp_path),
                    "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"))
  assert proc.returncode == 1
  errors = error_lines(proc)
  assert len(errors) == 1 and "is a file, not a folder" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_predict_refuses_an_out_folder_with_another_runs_results(tmp_path):
  """Refused in one line before the model loads (the workdir has no checkpoint: loading it
  would fail with another error), and the previous results are left as they were."""
  (tmp_path / "a.png").write_bytes(b"x")
  out = tmp_path / "out"
  out.mkdir()
  previous = '{"detections": [], "images": ["a.png"], "failed": []}'
  (out / "results.json").write_text(previous)
  (out / "0000_a.png").write_bytes(b"overlay")
  proc = run_script("predict.py", "--config", "experiments/shapes.py", "--workdir", str(tmp_path),
                    "--images", str(tmp_path / "a.png"), "--out", str(out))
  assert proc.returncode == 1
  errors = error_lines(proc)
  assert len(errors) == 1 and "holds another run's results (results.json and 1 overlay)" in \
      errors[0] and "--overwrite" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert (out / "results.json").read_text() == previous and (out / "0000_a.png").exists()
