"""Every experiment config loads, is self-consistent, and documents how to launch it."""

import glob
import os

import numpy as np
import pytest

from mrcnn_jax import inference
from mrcnn_jax.config import load_config_file
from mrcnn_jax.data import transforms

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
  transforms.check_resize(config.data.image_size, config.data.min_size, config.data.max_size)
  doc = open(path).read()
  assert "scripts/" in doc and "AP" in doc, "the docstring gives the launch command and its AP"


@pytest.mark.parametrize("name", ["coco_r50_fpn_1x.py", "coco_r50_fpn_3x.py",
                                  "coco_r101_fpn_3x.py"])
def test_coco_recipes_resize_as_their_references(name):
  """The torchvision / Detectron2 recipes predict at torchvision's sizes: a 480 x 640 COCO image
  at shorter side 800 (800 x 1066: torchvision floors, Detectron2 rounds to 1067), a 500 x 1500
  one at longer side 1333, padded to the static input."""
  config = load_config_file(os.path.join(_ROOT, "experiments", name))
  resize = (config.data.min_size, config.data.max_size)
  for hw, want in (((480, 640), [800, 1066]), ((500, 1500), [444, 1333])):
    pre = inference.preprocess(np.zeros(hw + (3,), np.uint8), config.data.image_size, *resize)
    np.testing.assert_array_equal(pre["valid_size"], want)


def test_missing_config_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config file not found"):
    load_config_file(str(tmp_path / "nope.py"))
