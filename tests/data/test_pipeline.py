"""Train/eval pipelines: static shapes, determinism, resume, 2-process sharding, global arrays
(the pipeline's host batches through ``mrcnn_jax.run.sharding.make_global_batch``)."""

import itertools
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from mrcnn_jax import data
from mrcnn_jax.data import pipeline
from mrcnn_jax.run import sharding
from tests.data.conftest import small_config


def _take(p, n):
  return list(itertools.islice(iter(p), n))


def test_static_shapes_and_contract(shapes_dir):
  _, paths = shapes_dir
  c = small_config(paths)
  p = data.build_train_dataset(c)
  want = {"image": ((4, 64, 64, 3), np.uint8), "gt_boxes": ((4, 8, 4), np.float32),
          "gt_classes": ((4, 8), np.int32), "gt_masks": ((4, 8, 14, 14), np.uint8),
          "gt_valid": ((4, 8), np.bool_), "image_id": ((4,), np.int32),
          "original_size": ((4, 2), np.int32), "image_scale": ((4, 2), np.float32),
          "valid_size": ((4, 2), np.int32), "example_valid": ((4,), np.bool_)}
  for key, spec in p.dataset.element_spec.items():  # static in the graph, not only per batch
    assert None not in spec.shape.as_list(), key
  for b in _take(p, 2):
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
    assert b["example_valid"].all()
    assert set(np.unique(b["gt_masks"])) <= {0, 1}
    v = b["gt_valid"]
    assert (b["gt_classes"][v] >= 1).all() and (b["gt_classes"][v] <= 3).all()
    assert (b["gt_classes"][~v] == 0).all() and not b["gt_boxes"][~v].any()
    bw = b["gt_boxes"][..., 2] - b["gt_boxes"][..., 0]
    assert (bw[v] >= 1).all()
    assert (b["gt_boxes"][..., 2] <= b["valid_size"][:, None, 1] + 1e-4).all()


def test_deterministic_and_resume(shapes_dir):
  _, paths = shapes_dir
  c = small_config(paths, num_parallel_calls=-1)
  a = _take(data.build_train_dataset(c), 4)
  b = _take(data.build_train_dataset(c), 4)
  resumed = _take(data.build_train_dataset(c, start_step=2), 2)
  other = _take(data.build_train_dataset(c, seed=9), 1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for x, y in zip(a[2:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["image_id"], other[0]["image_id"])


def test_train_epochs_are_permutations_over_two_hosts(shapes_dir):
  _, paths = shapes_dir
  c = small_config(paths)
  n = len(data.build_train_dataset(c, process_index=0, process_count=1).source)
  seen = {}  # global position -> image id
  hosts = []
  for p in range(2):
    pl = data.build_train_dataset(c, process_index=p, process_count=2)
    assert pl.host_batch_size == 2
    hosts.append(_take(pl, (2 * n) // 4 + 1))
    for j, b in enumerate(hosts[-1]):
      for e, image_id in enumerate(b["image_id"]):
        seen[j * 4 + p * 2 + e] = int(image_id)  # host p holds rows 2p, 2p+1 of batch j
  # The two hosts' batches, stacked, are the one-host global batch row for row (images,
  # augmentation and all), so a run does not depend on the number of hosts.
  single = _take(data.build_train_dataset(c, process_index=0, process_count=1), 3)
  for j in range(3):
    for k in single[j]:
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][j][k], hosts[1][j][k]]), single[j][k], err_msg=k)
  ids = [r.image_id for r in pl.source.records]
  epoch0 = [seen[g] for g in range(n)]
  epoch1 = [seen[g] for g in range(n, 2 * n)]
  assert sorted(epoch0) == sorted(ids) and sorted(epoch1) == sorted(ids)
  assert epoch0 != epoch1  # reshuffled every epoch


@pytest.mark.parametrize("global_batch", [2, 4, 6])
def test_eval_two_hosts_cover_every_image_once(shapes_dir, global_batch):
  _, paths = shapes_dir
  c = small_config(paths)
  ids, batches = [], []
  for p in range(2):
    pl = data.build_eval_dataset(c, global_batch_size=global_batch, process_index=p,
                                 process_count=2)
    got = list(pl)
    assert len(got) == pl.num_batches
    batches.append(len(got))
    for b in got:
      ids += b["image_id"][b["example_valid"]].tolist()
      assert (b["image_id"][~b["example_valid"]] == -1).all()
  assert batches[0] == batches[1]
  all_ids = [r.image_id for r in pl.source.records]
  assert len(all_ids) == 11 and sorted(ids) == sorted(all_ids)  # 11: padding is needed


def test_eval_positions():
  pos = [pipeline.eval_positions(5, 4, p, 2) for p in range(2)]
  # Each host holds a contiguous half of every global batch of 4.
  np.testing.assert_array_equal(pos[0], [0, 1, 4, -1])
  np.testing.assert_array_equal(pos[1], [2, 3, -1, -1])
  with pytest.raises(ValueError):
    pipeline.host_batch_size(6, 4)


def test_make_global_batch(shapes_dir):
  _, paths = shapes_dir
  c = small_config(paths)
  c.train.batch_size = 8
  devices = np.array(jax.devices()[:8])
  assert len(devices) == 8
  mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
  host = _take(data.build_train_dataset(c), 1)[0]
  glob = sharding.make_global_batch(host, mesh)
  for k, v in host.items():
    assert glob[k].shape == v.shape and glob[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(glob[k]), v)
    assert glob[k].sharding.spec[0] == "data"
    shard_rows = {s.data.shape[0] for s in glob[k].addressable_shards}
    assert shard_rows == {2}  # 8 examples over a 4-way data axis
  with pytest.raises(ValueError):
    sharding.make_global_batch(host, Mesh(devices, ("batch",)))


def test_training_stops_when_no_image_can_be_loaded(shapes_dir, tmp_path):
  """An existing but wrong image folder: every load fails, and training drops failed examples,
  so the stream would never yield a batch. It raises once 2n loads have all failed."""
  _, paths = shapes_dir
  c = small_config(paths, train_images=str(tmp_path))  # exists, holds no image
  p = data.build_train_dataset(c)
  with pytest.raises(data.BadExampleError, match=r"none of the first \d+ .*missing_image"):
    _take(p, 1)
  assert p.stats.as_dict()["missing_image"] >= 2 * len(p.source)


def test_training_keeps_going_while_some_images_load(shapes_dir, tmp_path):
  """One loadable image in 22 is enough: once one load has succeeded it never gives up."""
  _, paths = shapes_dir
  images = tmp_path / "train"
  images.mkdir()
  first = sorted(os.listdir(paths["train_images"]))[0]
  shutil.copy(os.path.join(paths["train_images"], first), images / first)
  p = data.build_train_dataset(small_config(paths, train_images=str(images)))
  batches = _take(p, 2)
  assert all(b["example_valid"].all() for b in batches)
