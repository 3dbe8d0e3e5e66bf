"""Predictor.predict_batch: static batches of images of any sizes, padding dropped, results those
of each image alone; host post-processing of one batch overlapped with the next batch."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mrcnn_jax import inference
from mrcnn_jax.inference import batch_predict
from tests.inference.tiny_predictor import tiny_predictor

# Five sizes (wide, tall, square, already 64 x 64, upscaled): with batch 3 the second batch has
# one padding slot.
SIZES = [(48, 100), (80, 40), (64, 64), (30, 90), (20, 24)]
KEYS = ("boxes", "scores", "classes", "labels", "category_ids", "masks")


@pytest.fixture(scope="module")
def predictor():
  return tiny_predictor(batch_size=3)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(3)
  return [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in SIZES]


def assert_same(a: dict, b: dict):
  assert sorted(a) == sorted(b) == sorted(KEYS)
  for k in KEYS:
    if k == "labels":
      assert a[k] == b[k]
    else:
      assert a[k].dtype == b[k].dtype, k
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_predict_batch_is_each_image_alone_bit_for_bit(predictor, images):
  """Two batches of 3 for 5 images (one padding slot): 5 results, each exactly what the image
  gives alone in the batch (other slots padding), in its own size; with and without overlap."""
  results = predictor.predict_batch(images)
  assert len(results) == len(images)  # the padding slot is dropped
  for image, (h, w), result in zip(images, SIZES, results):
    n = len(result["scores"])
    assert n > 0 and result["masks"].shape == (n, h, w)
    assert_same(result, predictor.predict_batch([image])[0])
  sequential = predictor.predict_batch(images, overlap=False)
  assert len(sequential) == len(images)
  for a, b in zip(results, sequential):
    assert_same(a, b)
  # A different neighbour order changes nothing either.
  for a, b in zip(results[::-1], predictor.predict_batch(images[::-1])):
    assert_same(a, b)
  assert predictor._predict._cache_size() == 1  # one program for every image size


def test_batch_of_one_is_predict_bit_for_bit(predictor, images):
  """At batch size 1 ``predict_batch`` runs ``predict``'s program: identical results."""
  single = copy.copy(predictor)
  single.batch_size = 1
  for a, image in zip(single.predict_batch(images[:3]), images[:3]):
    assert_same(a, predictor.predict(image))


def test_batch_matches_predict_up_to_float_rounding(predictor, images):
  """A batch-3 program is not a batch-1 program: XLA:CPU may round floats differently (last
  bits), so against ``predict`` the detections agree to float tolerance, classes exactly."""
  for a, image in zip(predictor.predict_batch(images), images):
    b = predictor.predict(image)
    np.testing.assert_array_equal(a["classes"], b["classes"])
    np.testing.assert_allclose(a["boxes"], b["boxes"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)
    # An untrained model's mask probabilities sit near the 0.5 threshold: a rounding may flip
    # a rare pixel.
    assert np.mean(a["masks"] != b["masks"]) < 1e-3


def test_overlap_dispatches_the_next_batch_before_post_processing(predictor, images,
                                                                  monkeypatch):
  """With overlap, batch k + 1 is read and dispatched before batch k is fetched and pasted
  (and before the caller sees k's results); without, each batch is finished first."""
  for overlap, expected in [
      (True, ["read", "read", "read", "dispatch", "read", "read", "dispatch", "post", "yield",
              "yield", "yield", "post", "yield", "yield"]),
      (False, ["read", "read", "read", "dispatch", "post", "yield", "yield", "yield", "read",
               "read", "dispatch", "post", "yield", "yield"])]:
    events = []
    p = copy.copy(predictor)
    jitted, post = predictor._predict, predictor._postprocess_batch

    def dispatch(*args, jitted=jitted):
      events.append("dispatch")
      return jitted(*args)

    def post_batch(pres, out, post=post):
      events.append("post")
      return post(pres, out)

    p._predict, p._postprocess_batch = dispatch, post_batch

    def feed():
      for image in images:
        events.append("read")
        yield image

    for _ in p.predict_iter(feed(), overlap=overlap):
      events.append("yield")
    assert events == expected, overlap


def test_predict_files_in_batches(predictor, images, tmp_path):
  """``predict_files`` with a batch predictor: an unreadable file in the middle is skipped and
  listed; every other image keeps its index and gets predict_batch's detections."""
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
    if i == 1:
      paths.append(str(tmp_path / "broken.png"))
      (tmp_path / "broken.png").write_bytes(b"not a png")
  out = inference.predict_files(predictor, paths, str(tmp_path / "out"))
  assert [p for p, _ in out["failed"]] == [str(tmp_path / "broken.png")]
  assert [os.path.basename(p) for p in out["overlays"]] == [
      "0000_0.png", "0001_1.png", "0003_2.png", "0004_3.png", "0005_4.png"]
  with open(out["results"]) as f:
    detections = json.load(f)["detections"]
  expected = []
  for i, result in enumerate(predictor.predict_batch(images)):
    index = i if i < 2 else i + 1  # broken.png took index 2
    expected += inference.to_coco_results(result, index, file_name=f"{i}.png")
  assert detections == json.loads(json.dumps(expected))


def test_stack_padded_and_chunks():
  a, b = np.ones((4, 6, 3), np.float32), np.full((4, 6, 3), 2, np.float32)
  images, valid = batch_predict.stack_padded([a, b], [np.array([3, 6]), np.array([4, 5])], 4)
  assert images.shape == (4, 4, 6, 3) and images.dtype == np.float32
  assert (images[0] == 1).all() and (images[1] == 2).all() and not images[2:].any()
  np.testing.assert_array_equal(valid, [[3, 6], [4, 5], [4, 6], [4, 6]])
  assert valid.dtype == np.int32
  with pytest.raises(ValueError, match="need 1..1 images"):
    batch_predict.stack_padded([a, b], [[3, 6], [4, 5]], 1)
  with pytest.raises(ValueError, match="share one"):
    batch_predict.stack_padded([a, a[:2]], [[3, 6], [2, 6]], 2)
  assert list(batch_predict.chunks(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
  assert list(batch_predict.chunks([], 3)) == []


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_bad_batch_size_is_refused(predictor, bad):
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
    inference.Predictor(predictor.config, {}, batch_size=bad)


def test_predict_script_bad_batch_size_is_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "scripts", "predict.py"), "--config",
       "experiments/shapes.py", "--workdir", str(tmp_path), "--images", str(tmp_path),
       "--out", str(tmp_path / "out"), "--batch_size", "0"],
      capture_output=True, text=True, cwd=root, timeout=300,
      env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: --batch_size must be >= 1, got 0"], proc.stderr[-2000:]
