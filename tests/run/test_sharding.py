"""The run's mesh and the host -> global batch (the pipeline's own batches: tests/data)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from mrcnn_jax import config as config_lib
from mrcnn_jax.modeling import batch_parallel
from mrcnn_jax.run import sharding


def test_one_data_axis_name():
  assert sharding.DATA_AXIS == batch_parallel.DATA_AXIS == "data"
  assert sharding.make_mesh().axis_names == ("data",)


def test_run_mesh_takes_num_devices():
  c = config_lib.get_base_config()
  c.num_devices = 3
  mesh = sharding.make_run_mesh(c)
  assert mesh.size == 3 and list(mesh.devices) == jax.devices()[:3]
  c.num_devices = 0
  assert sharding.make_run_mesh(c).size == jax.device_count()
  c.num_devices = jax.device_count() + 1
  with pytest.raises(ValueError, match="only .* devices exist"):
    sharding.make_run_mesh(c)


def test_batch_not_divisible_by_devices_raises():
  mesh = sharding.make_mesh(jax.devices())
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    sharding.make_global_batch({"image": np.zeros((6, 4, 4, 3), np.uint8)}, mesh)


def test_global_batch_splits_the_data_axis_and_replicates_the_others():
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "model"))
  host = {"image": np.arange(8 * 3).reshape(8, 3).astype(np.uint8),
          "valid": np.arange(8) % 2 == 0}
  out = sharding.make_global_batch(host, mesh)
  for k, v in host.items():
    np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert out[k].sharding.spec[0] == "data"
    assert {s.data.shape[0] for s in out[k].addressable_shards} == {2}
  with pytest.raises(ValueError, match="no 'data' axis"):
    sharding.make_global_batch(host, Mesh(devices.reshape(-1), ("batch",)))
  with pytest.raises(ValueError, match="scalar"):
    sharding.make_global_batch({"step": np.int32(3)}, mesh)


def test_replicated_shardings_cover_every_leaf():
  mesh = sharding.make_mesh(jax.devices()[:2])
  tree = {"a": np.zeros(3), "b": [np.ones(2), np.ones(1)]}
  shardings = sharding.replicated_shardings(tree, mesh)
  assert all(s == sharding.replicated(mesh) for s in jax.tree.leaves(shardings))
