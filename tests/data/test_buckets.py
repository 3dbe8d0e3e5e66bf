"""Aspect-ratio buckets: assignment, validation, single-bucket batches over 1 and 2 hosts, exact
resume, bad examples, and "only the padding differs" from the data down to the model."""

import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mrcnn_jax import data
from mrcnn_jax import modeling
from mrcnn_jax.config import load_config_file
from mrcnn_jax.data import buckets
from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data import transforms
from mrcnn_jax.data.batching import transform_kwargs
from mrcnn_jax.modeling.config import tiny_model_config
from tests.data.conftest import small_config

BUCKETS = ((64, 96), (96, 64))  # landscape (and square), portrait
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(paths, **overrides):
  """Shapes images (longer side 64) scaled to shorter side 48, longer <= 64, in BUCKETS."""
  return small_config(paths, **dict(dict(buckets=BUCKETS, min_size=48, max_size=64), **overrides))


def _take(p, n):
  return list(itertools.islice(iter(p), n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("hw, want", [
    ((480, 640), 0), ((640, 480), 1), ((500, 500), 0),  # a square ties: the first bucket
    ((999, 1000), 0), ((1001, 1000), 1), ((100, 1000), 0), ((1000, 100), 1)])
def test_assign_bucket_closest_aspect(hw, want):
  assert buckets.assign_bucket(*hw, ((832, 1344), (1344, 832))) == want
  # Listed the other way round: the same shape wins, and the square tie goes to the new first.
  swapped = buckets.assign_bucket(*hw, ((1344, 832), (832, 1344)))
  assert swapped == (0 if hw == (500, 500) else 1 - want)


def test_assign_bucket_three_buckets():
  three = ((640, 1280), (1024, 1024), (1280, 640))
  assert [buckets.assign_bucket(h, w, three) for h, w in
          ((300, 1000), (600, 800), (700, 700), (800, 600), (1000, 300))] == [0, 1, 1, 1, 2]


@pytest.mark.parametrize("value, resize, match", [
    ((64, 96), (0, 0), "pairs"),
    (((64, 100), (96, 64)), (0, 0), "multiples of 32"),
    (((0, 64),), (0, 0), "multiples of 32"),
    (((64, 96), (64, 96)), (0, 0), "same aspect"),
    (((64, 96), (128, 192)), (0, 0), "same aspect"),
    (((64, 96), (96, 64)), (64, 48), "min_size <= max_size"),
    # 100 > 96: the landscape bucket's widest images (aspect -> 0) are 100 wide.
    (((64, 96), (96, 64)), (48, 100), r"64x96 receives .* up to 48x100"),
    # One landscape bucket also gets every portrait image, up to max_size tall.
    (((64, 128),), (48, 96), r"64x128 receives .* up to 96x"),
    # COCO's pair with a short side below min_size.
    (((768, 1344), (1344, 832)), (800, 1333), r"768x1344 receives .* up to 800x1333"),
])
def test_check_buckets_errors(value, resize, match):
  with pytest.raises(ValueError, match=match):
    buckets.check_buckets(value, *resize)


def test_check_buckets_accepts():
  assert buckets.check_buckets([[64, 96], (96.0, 64)], 48, 64) == BUCKETS
  assert buckets.check_buckets(((832, 1344), (1344, 832)), 800, 1333) == ((832, 1344), (1344, 832))
  assert buckets.check_buckets(BUCKETS) == BUCKETS  # fit-into resize: any multiple of 32


@pytest.mark.parametrize("name", ["coco_r50_fpn_1x.py", "coco_r50_fpn_3x.py",
                                  "coco_r101_fpn_3x.py", "coco_r50_fpn_lsj.py"])
def test_coco_recipes_buckets(name):
  config = load_config_file(os.path.join(_ROOT, "experiments", name))
  sizes = list(data.train_batch_specs(config, 16))
  if name == "coco_r50_fpn_lsj.py":
    assert sizes == [(1024, 1024)]
  else:  # landscape / portrait, each holding 800 x 1333 (and multiples of the P6 stride, 64)
    assert sizes == [(832, 1344), (1344, 832)]
    assert all(v % 64 == 0 for s in sizes for v in s)
    assert tuple(config.data.image_size) == (1344, 1344)  # evaluation keeps the square


def test_bad_bucket_config_fails_when_the_pipeline_is_built(shapes_dir):
  _, paths = shapes_dir
  with pytest.raises(ValueError, match="multiples of 32"):
    data.build_train_dataset(_config(paths, buckets=((64, 90), (96, 64))))
  with pytest.raises(ValueError, match="need the 'coco' source"):
    data.build_train_dataset(_config(paths, source="tfds"))


def test_schedule_epochs_are_single_bucket_permutations():
  record_buckets = [0] * 11 + [1] * 6 + [2] * 2  # bucket 2 never fills a batch of 4
  s = buckets.BucketSchedule(record_buckets, 3, 4, seed=5)
  assert s.steps_per_epoch == 2 + 1
  epochs = []
  for e in range(3):
    records, owner, _, _ = s.epoch(e)
    for row, b in zip(records, owner):
      assert {record_buckets[r] for r in row} == {b}
    used = records.reshape(-1)
    assert len(set(used.tolist())) == used.size == 12  # no record twice; 3 + 2 + 2 dropped
    epochs.append(used.tolist())
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a fresh order every epoch
  # A pure function of (seed, step): another instance, other epochs cached, same answer.
  again = buckets.BucketSchedule(record_buckets, 3, 4, seed=5)
  again.epoch(7)
  np.testing.assert_array_equal(again.epoch(1)[0], s.epoch(1)[0])
  assert not np.array_equal(buckets.BucketSchedule(record_buckets, 3, 4, seed=6).epoch(1)[0],
                            s.epoch(1)[0])
  with pytest.raises(ValueError, match="no bucket holds a global batch"):
    buckets.BucketSchedule([0, 1, 1], 2, 4, seed=0)


def test_batches_one_bucket_each_and_two_hosts_give_the_global_batch(shapes_dir):
  _, paths = shapes_dir
  c = _config(paths)
  single = data.build_train_dataset(c, process_index=0, process_count=1)
  for key, spec in single.dataset.element_spec.items():  # static but for the bucket's h, w
    unknown = [i for i, v in enumerate(spec.shape.as_list()) if v is None]
    assert unknown == ([1, 2] if key == "image" else []), key
  sizes = {r.image_id: (r.height, r.width) for r in single.source.records}
  specs = data.train_batch_specs(c, 4)
  batches = _take(single, 8)  # over an epoch's end (5 batches: 14 landscape/square, 8 portrait)
  seen = set()
  for b in batches:
    shape = b["image"].shape[1:3]
    seen.add(shape)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == specs[shape]
    assert b["example_valid"].all()
    for image_id in b["image_id"]:  # every image in the bucket of its aspect
      assert BUCKETS[buckets.assign_bucket(*sizes[int(image_id)], BUCKETS)] == shape
    # Scaled as without buckets: shorter side 48 (no crop: jitter <= 1), inside the bucket.
    assert (b["valid_size"] <= np.asarray(shape)).all()
    assert (b["valid_size"].min(axis=1) <= 48).all() and (b["valid_size"].max(axis=1) <= 64).all()
    assert not b["image"][:, :, 64:].any() and not b["image"][:, 64:].any()  # padding only
  assert seen == set(BUCKETS)
  hosts = [_take(data.build_train_dataset(c, process_index=p, process_count=2), 8)
           for p in range(2)]
  stacked = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*hosts)]
  _assert_batches_equal(stacked, batches)


def test_buckets_narrower_than_max_size_on_one_side(shapes_dir):
  """As in the COCO recipes (800 / 1333 into 832x1344 and 1344x832): a bucket need only hold
  the images of its aspects, not max_size on both sides as a single image_size must."""
  _, paths = shapes_dir
  c = _config(paths, min_size=60, max_size=90)
  for b in _take(data.build_train_dataset(c, process_index=0, process_count=1), 6):
    assert tuple(b["image"].shape[1:3]) in BUCKETS
    assert (b["valid_size"].min(axis=1) <= 60).all() and (b["valid_size"].max(axis=1) <= 90).all()
    assert (b["valid_size"].max(axis=1) > 64).any()  # longer than the bucket's short side


def test_resume_from_start_step_is_the_uninterrupted_stream(shapes_dir):
  _, paths = shapes_dir
  c = _config(paths, num_parallel_calls=-1)
  straight = _take(data.build_train_dataset(c), 7)  # epoch 1 starts at step 5
  for start in (1, 3, 5):
    _assert_batches_equal(_take(data.build_train_dataset(c, start_step=start), 7 - start),
                          straight[start:])
  other = _take(data.build_train_dataset(c, seed=11), 4)
  assert any(not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(other, straight))


def test_bad_example_keeps_its_slot_in_its_bucket(shapes_dir, tmp_path):
  _, paths = shapes_dir
  clean = _take(data.build_train_dataset(_config(paths)), 4)
  images = tmp_path / "train"
  shutil.copytree(paths["train_images"], images)
  source = coco_lib.CocoSource(paths["train_annotations"], str(images), training=True)
  bad_id = int(clean[0]["image_id"][1])
  bad = next(r for r in source.records if r.image_id == bad_id)
  os.remove(bad.path)
  c = _config(paths, train_images=str(images))
  broken = data.build_train_dataset(c)
  got = _take(broken, 4)
  assert broken.stats.as_dict().get("missing_image", 0) >= 1
  for b_clean, b_got in zip(clean, got):
    assert b_got["image"].shape == b_clean["image"].shape  # same bucket, batch by batch
    assert b_got["example_valid"].all() and bad_id not in b_got["image_id"]
    same = b_clean["image_id"] != bad_id  # every other slot is untouched
    for k in b_clean:
      np.testing.assert_array_equal(b_got[k][same], b_clean[k][same], err_msg=k)
  replaced = int(got[0]["image_id"][1])
  assert replaced != bad_id
  assert (buckets.assign_bucket(bad.height, bad.width, BUCKETS)
          == buckets.assign_bucket(*next((r.height, r.width) for r in source.records
                                         if r.image_id == replaced), BUCKETS))
  _assert_batches_equal(_take(data.build_train_dataset(c, start_step=1), 3), got[1:])


def test_bucketed_stream_stops_when_no_image_can_be_loaded(shapes_dir, tmp_path):
  _, paths = shapes_dir
  p = data.build_train_dataset(_config(paths, train_images=str(tmp_path)))  # holds no image
  with pytest.raises(data.BadExampleError, match=r"no image of train bucket \d+x\d+ could be "
                     r"loaded .*missing_image"):
    _take(p, 1)


def _placed(raw, seed, size, kwargs):
  """``raw`` transformed into the bucket ``size`` (numpy dict)."""
  out = transforms.transform_example(raw, seed, **dict(kwargs, image_size=size))
  return {k: v.numpy() for k, v in out.items()}


def test_an_example_differs_between_buckets_only_by_its_padding(shapes_dir):
  """Scale, flip, boxes, masks and pixels are the bucket's business only where it pads."""
  _, paths = shapes_dir
  c = _config(paths, scale_range=(0.7, 1.0), random_flip=True)
  source = coco_lib.CocoSource(paths["train_annotations"], paths["train_images"], training=True)
  kwargs = transform_kwargs(c, training=True)
  square = next(i for i, r in enumerate(source.records) if r.height == r.width)
  raw = {k: tf.constant(v) for k, v in source.load(square).items()}
  for seed in range(4):  # several jitter / flip draws
    seed = tf.constant([7, seed], tf.int64)
    a, b = (_placed(raw, seed, size, kwargs) for size in BUCKETS)
    h, w = a["valid_size"]
    assert a["image"].shape[:2] == BUCKETS[0] and b["image"].shape[:2] == BUCKETS[1]
    np.testing.assert_array_equal(a["image"][:h, :w], b["image"][:h, :w])
    assert not a["image"][h:].any() and not a["image"][:, w:].any()
    assert not b["image"][h:].any() and not b["image"][:, w:].any()
    for k in a:
      if k != "image":
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _padding_free_variables(model, seed):
  """Random kernels and BN scales, zero biases and BN shifts: a zero input stays exactly zero
  through every layer (as with a fresh init), so the padding carries nothing into the network."""
  shapes = jax.eval_shape(lambda k: modeling.init_variables(model, k, (64, 64)),
                          jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
    if name in ("scale", "var"):
      return (1.0 + 0.2 * rng.random(shape)).astype(np.float32)
    return np.zeros(shape, np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_model_losses_and_predictions_do_not_depend_on_the_bucket_beyond_padding(shapes_dir):
  """The same example in a landscape and a portrait bucket gives the same losses, detections
  and masks. Set up so that the padding has no say: the model keeps zero padding at zero
  (:func:`_padding_free_variables`), the buckets leave the image's receptive field inside both
  (zero-padded convolutions near an array edge see other values in a smaller bucket, as in
  any padded torchvision batch), and the RPN loss takes every anchor (a random subset of the
  padding's negatives would differ). Anything else the bucket changed, where the image sits,
  its scale, the anchors over it, the targets, would show."""
  _, paths = shapes_dir
  big = ((192, 256), (256, 192))
  c = _config(paths, buckets=big, min_size=32, max_size=32, scale_range=(1.0, 1.0))
  source = coco_lib.CocoSource(paths["train_annotations"], paths["train_images"], training=True)
  raw = {k: tf.constant(v) for k, v in source.load(0).items()}
  kwargs = transform_kwargs(c, training=True)
  placed = [_placed(raw, tf.constant([1, 2], tf.int64), size, kwargs) for size in big]
  cfg = tiny_model_config(num_classes=4)
  cfg.roi.score_threshold = 0.0  # a random model's scores are low: keep its detections
  cfg.rpn.batch_size_per_image = 1 << 14  # >= the 12276 anchors of either bucket
  cfg.mask.chunk_size = 0  # one mask-head chunk: the same numbers, a smaller program to compile
  model = modeling.MaskRCNN(cfg)
  variables = _padding_free_variables(model, seed=0)

  @jax.jit
  def run(batch):
    losses, stats = model.apply(variables, batch, rngs={"sampling": jax.random.PRNGKey(3)},
                                method=modeling.MaskRCNN.losses)
    detections = model.apply(variables, batch["image"], batch["valid_size"],
                             method=modeling.MaskRCNN.predict)
    return losses, stats, detections

  outs = [jax.device_get(run({k: jnp.asarray(v[None]) for k, v in p.items()
                              if k != transforms.NUM_TRUNCATED_KEY})) for p in placed]
  (losses_a, stats_a, det_a), (losses_b, stats_b, det_b) = outs
  assert stats_a["roi_num_fg"] >= 1 and det_a["valid"].sum() >= 5, "too little to compare"
  for k in losses_a:
    np.testing.assert_allclose(losses_a[k], losses_b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in stats_a:
    np.testing.assert_array_equal(stats_a[k], stats_b[k], err_msg=k)
  for k in det_a:
    np.testing.assert_allclose(np.asarray(det_a[k], np.float32), np.asarray(det_b[k], np.float32),
                               rtol=1e-5, atol=1e-5, err_msg=k)
