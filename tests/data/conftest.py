"""Fixtures for the input-pipeline tests: small synthetic shapes data sets, one each per session."""

from pycocotools import mask as mask_utils
import pytest

from mrcnn_jax.config import get_base_config
from mrcnn_jax.data import shapes


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes")
  paths = shapes.generate(str(out), num_train=24, num_val=11, size=64, seed=3)
  return str(out), paths


@pytest.fixture(scope="session")
def keypoint_shapes_dir(tmp_path_factory):
  """A small shapes set with keypoints (K = 4: top, right, bottom, left)."""
  out = tmp_path_factory.mktemp("shapes_keypoints")
  paths = shapes.generate(str(out), num_train=10, num_val=6, size=64, seed=3, keypoints=True)
  return str(out), paths


def small_config(paths, **data_overrides):
  """A tiny config (64x64 input, 14x14 masks, 8 instances) pointed at ``paths``."""
  c = get_base_config()
  c.data.update(paths)
  c.data.image_size = (64, 64)
  c.data.mask_size = 14
  c.data.max_instances = 8
  c.data.num_parallel_calls = 2
  c.train.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.update(data_overrides)
  return c


def decode_segmentation(seg, h: int, w: int):
  """[h, w] uint8 mask of a COCO segmentation (polygons, uncompressed or compressed RLE),
  decoded with pycocotools directly (the oracle for what the data layer reads)."""
  if isinstance(seg, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  elif isinstance(seg["counts"], list):
    rle = mask_utils.frPyObjects(seg, h, w)
  else:
    rle = dict(seg, counts=seg["counts"].encode())
  return mask_utils.decode(rle)
