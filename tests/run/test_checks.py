"""Start-up checks: a missing data or weights path and a source that cannot be evaluated fail in one
line, before any device work."""

from __future__ import annotations

import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax.run import checks


def test_missing_data_path_names_the_field(tmp_path):
  c = config_lib.get_base_config()
  c.data.train_annotations = str(tmp_path / "missing.json")
  with pytest.raises(FileNotFoundError, match=r"config.data.train_annotations not found"):
    checks.check_data_paths(c)


def test_tfds_source_with_evaluation_is_refused_before_training():
  """The evaluator needs a COCO JSON; a TFDS run that asks for evaluation (eval.at_end is on by
  default) must fail at the start, not after training every step."""
  config = config_lib.get_base_config()
  config.data.source = "tfds"
  with pytest.raises(ValueError, match="COCO evaluation needs an instances JSON"):
    checks.check_data_paths(config, train=True, evaluate=True)
  checks.check_data_paths(config, train=True, evaluate=False)  # training alone is fine


def test_record_paths_replace_the_json_and_images(tmp_path):
  c = config_lib.get_base_config()
  c.data.train_records = str(tmp_path / "train-*-of-*.tfrecord")
  with pytest.raises(FileNotFoundError, match=r"config.data.train_records: no file matches"):
    checks.check_data_paths(c, evaluate=False)
  (tmp_path / "train-00000-of-00001.tfrecord").write_bytes(b"")
  checks.check_data_paths(c, evaluate=False)  # no train_annotations / train_images needed
  c.data.eval_records = str(tmp_path / "val.index.json")
  with pytest.raises(FileNotFoundError, match=r"config.data.eval_records not found: .*val"):
    checks.check_data_paths(c)


def test_missing_weights_name_the_field(tmp_path):
  c = config_lib.get_base_config()
  c.init_weights = str(tmp_path / "weights.npz")
  with pytest.raises(FileNotFoundError, match=r"config.init_weights not found: .*weights.npz"):
    checks.check_weight_paths(c)
  c.init_weights, c.resume = "", str(tmp_path / "other_run")
  with pytest.raises(FileNotFoundError, match=r"config.resume not found: .*other_run"):
    checks.check_weight_paths(c)
  (tmp_path / "other_run").mkdir()
  checks.check_weight_paths(c)


def test_num_classes_must_match_the_data_set():
  class Categories:
    num_classes = 4

  c = config_lib.get_base_config()
  c.model.num_classes = 4
  checks.check_num_classes(c, Categories())
  c.model.num_classes = 5
  with pytest.raises(ValueError, match=r"has 3 categories \(\+1 background = 4\)"):
    checks.check_num_classes(c, Categories())
