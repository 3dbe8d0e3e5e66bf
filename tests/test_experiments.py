"""Every experiment config loads, is self-consistent, and documents how to launch it."""

import glob
import os

import pytest

from mrcnn_jax.config import load_config_file

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXPERIMENTS = sorted(glob.glob(os.path.join(_ROOT, "experiments", "*.py")))


def test_there_are_experiments():
  names = {os.path.basename(p) for p in _EXPERIMENTS}
  assert {"shapes.py", "coco_r50_fpn_1x.py", "coco_r50_fpn_3x.py", "coco_r101_fpn_3x.py",
          "coco_r50_fpn_lsj.py"} <= names


@pytest.mark.parametrize("path", _EXPERIMENTS, ids=os.path.basename)
def test_experiment_loads_and_is_consistent(path):
  config = load_config_file(path)
  h, w = config.data.image_size
  assert h % 64 == 0 and w % 64 == 0, "inputs are padded to a multiple of the P6 stride"
  assert config.model.num_classes >= 2
  assert config.train.batch_size > 0 and config.train.num_steps > 0
  doc = open(path).read()
  assert "scripts/" in doc and "AP" in doc, "the docstring gives the launch command and its AP"


def test_missing_config_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config file not found"):
    load_config_file(str(tmp_path / "nope.py"))
