"""Record files (mrcnn_jax.data.records): the conversion finds what the JSON source skips, and
the pipeline reading them gives the JSON source's batches bit for bit (train, buckets, eval,
keypoints), resumes exactly, and each of two hosts reads only its share."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mrcnn_jax import data
from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data import records
from tests.data.conftest import small_config

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKETS = ((64, 96), (96, 64))


def _take(pipeline, n):
  return [b for b, _ in zip(pipeline, range(n))]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
      assert x[k].dtype == y[k].dtype, k


def make_flawed_copy(src_root: str, dst_root: str) -> dict:
  """A copy of a shapes set with one missing and one corrupt training image and one bad
  training annotation (a bbox outside its image) and one bad image entry; returns its
  config.data paths."""
  shutil.copytree(src_root, dst_root)
  paths = data.shapes_data_paths(dst_root)
  with open(paths["train_annotations"]) as f:
    js = json.load(f)
  annotated = sorted({a["image_id"] for a in js["annotations"] if not a.get("iscrowd")})
  by_id = {im["id"]: im for im in js["images"]}
  os.remove(os.path.join(paths["train_images"], by_id[annotated[0]]["file_name"]))
  with open(os.path.join(paths["train_images"], by_id[annotated[1]]["file_name"]), "wb") as f:
    f.write(b"not an image")
  bad = next(a for a in js["annotations"] if a["image_id"] == annotated[2])
  bad["bbox"] = [1000.0, 1000.0, 5.0, 5.0]
  js["images"].append({"id": 999999, "height": 64})  # no file_name, no width
  with open(paths["train_annotations"], "w") as f:
    json.dump(js, f)
  return paths


@pytest.fixture(scope="module")
def converted(shapes_dir, tmp_path_factory):
  """(paths of a flawed shapes copy, {split: ConversionReport}), converted with 3 shards."""
  root = str(tmp_path_factory.mktemp("records"))
  paths = make_flawed_copy(shapes_dir[0], os.path.join(root, "shapes"))
  reports = {split: records.write_records(paths[f"{split}_annotations"], paths[f"{split}_images"],
                                          os.path.join(root, "rec", split), num_shards=3)
             for split in ("train", "eval")}
  return paths, reports


def test_conversion_counts_and_lists_what_the_json_source_skips(converted):
  paths, reports = converted
  rep = reports["train"]
  assert len(rep.shards) == 3 and all(os.path.exists(s) for s in rep.shards)
  # The JSON source (evaluation mode keeps every image) loading every image once.
  source = coco_lib.CocoSource(paths["train_annotations"], paths["train_images"],
                               training=False, stats=coco_lib.DataStats())
  for i in range(len(source)):
    source.load(i)
  assert rep.counts == source.stats.as_dict() == {
      "bad_annotation": 1, "bad_image_entry": 1, "missing_image": 1, "corrupt_image": 1}
  assert rep.num_images == len(source) and rep.num_records == len(source) - 2
  with open(rep.index) as f:
    index = json.load(f)
  assert [r for r, _ in index["construction_problems"]] == ["bad_image_entry", "bad_annotation"]
  assert sorted(r for r, _ in index["load_failures"].values()) == ["corrupt_image",
                                                                   "missing_image"]
  assert index["images"]["id"] == [r.image_id for r in source.records]
  assert reports["eval"].counts == {} and reports["eval"].num_records == 11


def test_records_hold_the_images_as_stored(converted):
  paths, reports = converted
  src = records.RecordSource(reports["eval"].index, training=False)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for i, rec in enumerate(src.records):
    ex = tf.train.Example.FromString(src.read_record(i)).features.feature
    with open(rec.path, "rb") as f:
      assert ex["image/encoded"].bytes_list.value[0] == f.read()
    assert ex["image/id"].int64_list.value[0] == rec.image_id


def test_record_specs_name_one_index(converted):
  rep = converted[1]["train"]
  pattern = rep.index.replace(".index.json", "-*-of-*.tfrecord")
  for spec in (rep.index, pattern, ",".join(rep.shards), rep.shards, rep.shards[1]):
    assert records.index_path(spec) == rep.index


def test_train_batches_and_skips_equal_the_json_source(converted):
  paths, reports = converted
  from_json = data.build_train_dataset(small_config(paths))
  from_records = data.build_train_dataset(small_config(
      paths, train_records=reports["train"].index.replace(".index.json", "-*-of-*.tfrecord")))
  assert [r.image_id for r in from_records.source.records] == [
      r.image_id for r in from_json.source.records]
  assert_same_batches(_take(from_json, 5), _take(from_records, 5))
  # (How many skips training counts depends on how far tf.data has read ahead.)
  assert from_json.stats.as_dict()["missing_image"]
  assert from_records.stats.as_dict()["missing_image"]


def test_bucketed_train_and_resume_equal_the_json_source(converted):
  paths, reports = converted
  kw = dict(buckets=BUCKETS, min_size=48, max_size=64)
  from_json = _take(data.build_train_dataset(small_config(paths, **kw)), 5)
  config = small_config(paths, train_records=reports["train"].index, **kw)
  assert_same_batches(from_json, _take(data.build_train_dataset(config), 5))
  assert_same_batches(from_json[3:], _take(data.build_train_dataset(config, start_step=3), 2))


@pytest.mark.parametrize("split", ["eval", "train"])
def test_eval_batches_skips_and_ground_truth_equal_the_json_source(converted, split):
  paths, reports = converted
  json_paths = dict(paths, eval_annotations=paths[f"{split}_annotations"],
                    eval_images=paths[f"{split}_images"])
  from_json = data.build_eval_dataset(small_config(json_paths))
  from_records = data.build_eval_dataset(small_config(paths, eval_records=reports[split].index))
  assert_same_batches(list(from_json), list(from_records))
  # Every image read once: the same skips, counted the same (none in the eval split).
  assert from_records.stats.as_dict() == from_json.stats.as_dict() == reports[split].counts
  assert from_records.source.load_failures == from_json.source.load_failures
  assert from_records.source.ground_truth() == from_json.source.ground_truth()
  for key in ("categories", "images"):
    assert from_records.source.dataset[key] == from_json.source.dataset[key]
  # Evaluation's report (images listed / evaluated / skipped, annotations refused) alike.
  from mrcnn_jax.evaluation.evaluator import data_report  # pylint: disable=g-import-not-at-top
  evaluated = {r.image_id for r in from_json.source.records} - set(from_json.source.load_failures)
  assert data_report(from_records.source, evaluated, from_records.source.load_failures) == \
      data_report(from_json.source, evaluated, from_json.source.load_failures)


def test_two_hosts_each_read_only_their_share(converted):
  paths, reports = converted
  config = small_config(paths, eval_records=reports["eval"].index)
  read = []
  for p in range(2):
    source = records.RecordSource(reports["eval"].index, training=False)
    mine = set()
    original = source.read_record
    source.read_record = lambda i, original=original, mine=mine: (mine.add(i), original(i))[1]
    list(data.build_eval_dataset(config, global_batch_size=4, process_index=p, process_count=2,
                                 source=source))
    read.append(mine)
  assert not read[0] & read[1] and read[0] | read[1] == set(range(11))
  # Training: the two hosts' batches, stacked, are the one-host global batch (with buckets,
  # where a bad image's slot is refilled rather than dropped, shifting that host's stream).
  config = small_config(paths, train_records=reports["train"].index, buckets=BUCKETS,
                        min_size=48, max_size=64)
  hosts = [_take(data.build_train_dataset(config, process_index=p, process_count=2), 3)
           for p in range(2)]
  single = _take(data.build_train_dataset(config, process_index=0, process_count=1), 3)
  for j in range(3):
    for k in single[j]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][j][k], hosts[1][j][k]]),
                                    single[j][k], err_msg=k)


def test_keypoint_records_equal_the_json_source(keypoint_shapes_dir, tmp_path):
  _, paths = keypoint_shapes_dir
  rep = records.write_records(paths["train_annotations"], paths["train_images"],
                              str(tmp_path / "kp" / "train"), num_shards=2)

  def config(**overrides):
    c = small_config(paths, **overrides)
    c.model.keypoint.enabled = True
    c.model.keypoint.num_keypoints = 4
    return c

  a = _take(data.build_train_dataset(config()), 3)
  b = _take(data.build_train_dataset(config(train_records=rep.index)), 3)
  assert "gt_keypoints" in b[0]
  assert_same_batches(a, b)


def test_bad_record_specs_are_one_line(converted, tmp_path):
  _, reports = converted
  with pytest.raises(FileNotFoundError, match="no file matches"):
    records.index_path(str(tmp_path / "nothing-*-of-*.tfrecord"))
  with pytest.raises(ValueError, match="neither an index"):
    records.index_path(str(tmp_path / "x.json"))
  with pytest.raises(FileNotFoundError, match="index not found"):
    records.RecordSource(str(tmp_path / "missing.index.json"), training=True)
  # A shard cut short (or from another conversion) is refused before anything is read.
  folder = tmp_path / "cut"
  shutil.copytree(os.path.dirname(reports["eval"].index), folder)
  shard = folder / os.path.basename(reports["eval"].shards[1])
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(ValueError, match="its index says"):
    records.RecordSource(str(folder / "eval.index.json"), training=False)


def test_make_records_script(converted, tmp_path):
  paths, _ = converted
  out = str(tmp_path / "script" / "train")
  proc = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "scripts", "make_records.py"),
       f"--annotations={paths['train_annotations']}", f"--images={paths['train_images']}",
       f"--output={out}", "--num_shards=2"],
      capture_output=True, text=True, timeout=120, cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr
  assert os.path.exists(out + ".index.json")
  assert "missing_image" in proc.stdout and "train-00001-of-00002.tfrecord" in proc.stdout
  with pytest.raises(FileNotFoundError, match="COCO annotation file not found"):
    records.write_records(str(tmp_path / "none.json"), paths["train_images"], out, 2)


def test_raise_mode_raises_what_the_json_source_raises(converted):
  paths, reports = converted
  with pytest.raises(coco_lib.BadExampleError) as from_json:
    coco_lib.CocoSource(paths["train_annotations"], paths["train_images"], training=True,
                        on_bad_example="raise")
  with pytest.raises(coco_lib.BadExampleError) as from_records:
    records.RecordSource(reports["train"].index, training=True, on_bad_example="raise")
  assert str(from_records.value) == str(from_json.value)
