"""The input pipeline on the storage emulator: a COCO JSON and image folder in a bucket, and
record files converted from and into a bucket, give the local copy's batches bit for bit (a
missing image counted as a skip on both)."""

import os

import pytest
import tensorflow as tf

from mrcnn_jax import data
from mrcnn_jax.data import records
from tests.data.conftest import small_config
from tests.data.test_records import _take, assert_same_batches


@pytest.fixture(scope="module")
def shapes_here_and_there(gcs, tmp_path_factory):
  """(local paths, gs:// paths) of one small shapes set, one annotated training image missing
  from both."""
  root = str(tmp_path_factory.mktemp("shapes_gcs"))
  local = data.generate_shapes(root, num_train=12, num_val=5, size=64, seed=5)
  source = data.CocoSource(local["train_annotations"], local["train_images"], training=True)
  os.remove(source.records[1].path)
  bucket = gcs.new_bucket("data")
  gcs.upload(root, bucket + "/shapes")
  remote = {k: bucket + "/shapes/" + os.path.relpath(v, root).replace(os.sep, "/")
            for k, v in local.items()}
  return local, remote, bucket


def test_json_and_images_in_a_bucket_give_the_local_batches(shapes_here_and_there):
  local, remote, _ = shapes_here_and_there
  assert remote["train_images"].startswith("gs://")
  here = data.build_train_dataset(small_config(local))
  there = data.build_train_dataset(small_config(remote))
  assert_same_batches(_take(here, 4), _take(there, 4))
  assert here.stats.as_dict()["missing_image"] and there.stats.as_dict()["missing_image"]
  # Evaluation reads every image once: the same skips, counted the same.
  def on_train(p):
    return dict(eval_annotations=p["train_annotations"], eval_images=p["train_images"])

  here = data.build_eval_dataset(small_config(local, **on_train(local)))
  there = data.build_eval_dataset(small_config(remote, **on_train(remote)))
  assert_same_batches(list(here), list(there))
  assert here.stats.as_dict() == there.stats.as_dict() == {"missing_image": 1}
  assert_same_batches(list(data.build_eval_dataset(small_config(local))),
               list(data.build_eval_dataset(small_config(remote))))


def test_records_made_from_and_into_a_bucket(shapes_here_and_there):
  local, remote, bucket = shapes_here_and_there
  rep = records.write_records(remote["train_annotations"], remote["train_images"],
                              bucket + "/records/train", num_shards=2)
  assert rep.counts == {"missing_image": 1} and tf.io.gfile.exists(rep.shards[1])
  kw = dict(buckets=((64, 96), (96, 64)), min_size=48, max_size=64)
  here = _take(data.build_train_dataset(small_config(local, **kw)), 4)
  pattern = bucket + "/records/train-*-of-*.tfrecord"
  assert_same_batches(here, _take(data.build_train_dataset(small_config(remote, train_records=pattern,
                                                            **kw)), 4))
  assert_same_batches(here[2:], _take(data.build_train_dataset(
      small_config(remote, train_records=rep.index, **kw), start_step=2), 2))


def test_missing_records_are_one_line(shapes_here_and_there, gcs):
  _, _, bucket = shapes_here_and_there
  with pytest.raises(FileNotFoundError, match="records: index not found"):
    records.RecordSource(bucket + "/nothing/train.index.json", training=True)
  with pytest.raises(FileNotFoundError, match="no file matches"):
    records.index_path(bucket + "/nothing/train-*-of-*.tfrecord")
  with pytest.raises(FileNotFoundError, match="COCO annotation file not found"):
    data.CocoSource(bucket + "/nothing/instances.json", bucket, training=True)


def test_tfds_data_dir_in_a_bucket(gcs, shapes_here_and_there, tmp_path):
  """TFDS reads a prepared data set from a gs:// data_dir (passed through as given)."""
  from tests.data import test_tfds_source  # pylint: disable=g-import-not-at-top  # its builder
  local, _, bucket = shapes_here_and_there
  val = (local["eval_annotations"], local["eval_images"])  # (train misses an image)
  test_tfds_source._SHAPES_JSON.update(train=val, val=val)  # pylint: disable=protected-access
  test_tfds_source.FakeCocoShapes(data_dir=str(tmp_path)).download_and_prepare()
  gcs.upload(str(tmp_path), bucket + "/tfds")
  kw = dict(source="tfds", tfds_name="fake_coco_shapes", tfds_masks="panoptic")
  here = list(data.build_eval_dataset(small_config(local, tfds_data_dir=str(tmp_path), **kw)))
  there = list(data.build_eval_dataset(small_config(local, tfds_data_dir=bucket + "/tfds", **kw)))
  assert len(there) == 2
  assert_same_batches(here, there)
