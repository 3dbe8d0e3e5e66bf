"""Predictor: any image size in, original-coordinate instances out; predict_files skips bad files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mrcnn_jax import inference
from pycocotools import mask as mask_util
from tests.inference.tiny_predictor import tiny_predictor


@pytest.fixture(scope="module")
def predictor():
  return tiny_predictor()


def test_preprocess_matches_the_eval_geometry():
  image = np.random.default_rng(0).integers(0, 255, (30, 90, 3), dtype=np.uint8)
  pre = inference.preprocess(image, (64, 64))
  assert pre["image"].shape == (64, 64, 3)
  np.testing.assert_array_equal(pre["valid_size"], [21, 64])  # 30 x 90 scaled by 64/90
  np.testing.assert_array_equal(pre["original_size"], [30, 90])
  np.testing.assert_allclose(pre["image_scale"], [21 / 30, 64 / 90], rtol=1e-6)
  assert pre["image"][21:].max() == 0  # zero padding below the valid region


def test_preprocess_shorter_side_rule():
  """With min_size / max_size the predictor resizes as torchvision does: 480 x 640 -> 800 x
  1066 (torchvision floors 1066.67; fitting 1344 x 1344 would give 1008 x 1344)."""
  image = np.zeros((480, 640, 3), np.uint8)
  pre = inference.preprocess(image, (1344, 1344), 800, 1333)
  np.testing.assert_array_equal(pre["valid_size"], [800, 1066])
  assert pre["image"].shape == (1344, 1344, 3)


@pytest.mark.parametrize("hw, resize, image_size", [
    ((150, 226), (200, 333), (336, 336)),   # x 4/3, 301.33 wide
    ((120, 182), (160, 256), (256, 256)),   # x 4/3, 242.67 wide: floor, not round
    ((480, 640), (800, 1333), (1344, 1344)),
    ((500, 1500), (800, 1333), (1344, 1344)),  # longer side capped, downscaled
    ((200, 120), (100, 160), (160, 160)),    # x 0.8, longer side capped
    ((100, 160), (100, 160), (160, 160)),    # scale 1: the image's own pixels
])
def test_preprocess_resizes_as_torchvision(hw, resize, image_size):
  """The valid region is torchvision's resized float image (``GeneralizedRCNNTransform``) bit
  for bit: same size, same source pixels and weights, not rounded to uint8. torchvision
  normalises before resizing, ``MaskRCNN`` after: both affine, they differ by float rounding."""
  torch = pytest.importorskip("torch")
  tv_transform = pytest.importorskip("torchvision.models.detection.transform")
  image = np.random.default_rng(0).integers(0, 256, hw + (3,), dtype=np.uint8)
  pre = inference.preprocess(image, image_size, *resize)
  x = torch.from_numpy(image).permute(2, 0, 1).float()
  identity = tv_transform.GeneralizedRCNNTransform(*resize, [0.0] * 3, [1.0] * 3).eval()
  with torch.no_grad():
    batch, _ = identity([x])
  rh, rw = batch.image_sizes[0]
  np.testing.assert_array_equal(pre["valid_size"], [rh, rw])
  np.testing.assert_array_equal(pre["image"][:rh, :rw], batch.tensors[0, :, :rh, :rw].permute(
      1, 2, 0).numpy())
  assert pre["image"][rh:].max(initial=0) == 0 and pre["image"][:, rw:].max(initial=0) == 0
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  with torch.no_grad():
    batch, _ = tv_transform.GeneralizedRCNNTransform(*resize, mean, std).eval()([x / 255.0])
  ours = (pre["image"][:rh, :rw] - 255 * np.float32(mean)) / (255 * np.float32(std))
  np.testing.assert_allclose(ours, batch.tensors[0, :, :rh, :rw].permute(1, 2, 0).numpy(),
                             rtol=0, atol=1e-5)


@pytest.mark.slow
def test_predict_any_size_and_files(predictor, tmp_path):
  rng = np.random.default_rng(1)
  images_dir = tmp_path / "images"
  images_dir.mkdir()
  sizes = [(48, 100), (80, 40)]
  for i, (h, w) in enumerate(sizes):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images_dir / f"{i}.png")
  (images_dir / "broken.jpg").write_bytes(b"not a jpeg")

  for h, w in sizes:
    image = np.asarray(Image.open(images_dir / f"{sizes.index((h, w))}.png"))
    r = predictor(image)
    n = len(r["scores"])
    assert n > 0
    assert r["boxes"].shape == (n, 4) and r["masks"].shape == (n, h, w)
    assert r["masks"].dtype == bool
    assert (r["boxes"][:, [0, 2]] <= w).all() and (r["boxes"][:, [1, 3]] <= h).all()
    assert (r["boxes"] >= 0).all() and np.all(np.diff(r["scores"]) <= 0)
    assert set(r["labels"]) <= {"square", "circle"}
    assert set(r["category_ids"].tolist()) <= {1, 7}

  out_dir = tmp_path / "out"
  paths = inference.expand_image_paths(str(images_dir))
  assert [os.path.basename(p) for p in paths] == ["0.png", "1.png", "broken.jpg"]
  out = inference.predict_files(predictor, paths, str(out_dir))
  assert [p for p, _ in out["failed"]] == [str(images_dir / "broken.jpg")]
  assert len(out["overlays"]) == 2
  for png, (h, w) in zip(out["overlays"], sizes):
    assert np.asarray(Image.open(png)).shape == (h, w, 3)
  with open(out["results"]) as f:
    results = json.load(f)
  assert results["failed"][0]["path"].endswith("broken.jpg")
  dets = results["detections"]
  assert len(dets) == out["num_instances"] > 0
  for d in dets:
    assert d["image_id"] in (0, 1) and d["category_id"] in (1, 7)
    h, w = sizes[d["image_id"]]
    assert d["segmentation"]["size"] == [h, w]
    mask = mask_util.decode(d["segmentation"])
    assert mask.shape == (h, w)


def test_one_compilation_for_images_of_any_size(predictor):
  """Resized (float) and unresized images alike feed one compiled program (static shapes)."""
  rng = np.random.default_rng(2)
  for hw in ((64, 64), (30, 90), (100, 37)):
    predictor(rng.integers(0, 256, hw + (3,), dtype=np.uint8))
  assert predictor._predict._cache_size() == 1  # pylint: disable=protected-access


def test_predict_files_skips_an_image_pillow_refuses_as_too_large(predictor, tmp_path,
                                                                  monkeypatch):
  """Pillow's DecompressionBombError (images over ~179 M pixels) is not an OSError: one such
  file must be a listed skip, not the end of the batch and of its results.json."""
  small, big = tmp_path / "small.png", tmp_path / "big.png"
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(small)
  Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(big)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60x90 is over twice that, 20x30 not
  out = inference.predict_files(predictor, [str(small), str(big)], str(tmp_path / "out"))
  assert [p for p, _ in out["failed"]] == [str(big)]
  assert "DecompressionBombError" in out["failed"][0][1]
  assert len(out["overlays"]) == 1 and os.path.exists(out["results"])


def test_load_image_turns_by_exif_orientation(tmp_path):
  """A photo stored 32 x 64 with EXIF orientation 6 (turn 90 degrees clockwise) is shown 64 x
  32: the predictor loads it upright; data-set decoding keeps the stored pixels (COCO's)."""
  from mrcnn_jax.data import coco  # pylint: disable=g-import-not-at-top
  stored = np.zeros((32, 64, 3), np.uint8)
  stored[:, :8] = 255  # a white band on the stored image's left edge
  exif = Image.Exif()
  exif[0x0112] = 6
  path = str(tmp_path / "photo.jpg")
  Image.fromarray(stored).save(path, exif=exif, quality=95)
  upright = inference.load_image(path)
  assert upright.shape == (64, 32, 3)
  assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # the band is now on top
  assert coco.decode_image_rgb(path).shape == (32, 64, 3)


def test_expand_image_paths_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no image found"):
    inference.expand_image_paths(str(tmp_path / "*.png"))


def test_from_workdir_refuses_a_checkpoint_of_another_model_config(predictor, tmp_path):
  """Parameters load by name: a checkpoint trained with other anchors, pixel mean or RoIAlign
  alignment would predict wrong boxes without any error, so predict and evaluate check the
  model config saved with it, as resuming training does."""
  from mrcnn_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.run import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  config = predictor.config
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(3, {"params": predictor.variables["params"]}, ckpt_lib.checkpoint_meta(config, 3, 3),
            force=True)
  ckpt.close()
  assert inference.Predictor.from_workdir(config, str(tmp_path)).config is config  # same: loads
  tuned = config.copy_and_resolve_references()  # inference settings may change
  tuned.model.roi.score_threshold, tuned.model.detections_per_image = 0.3, 50
  tuned.model.rpn.post_nms_top_k_test = 300
  assert inference.Predictor.from_workdir(tuned, str(tmp_path)).config is tuned
  other = config.copy_and_resolve_references()
  other.model.roi.aligned = not other.model.roi.aligned
  with pytest.raises(ValueError, match=r"different model config \(model.roi.aligned\)"):
    inference.Predictor.from_workdir(other, str(tmp_path))
  (tmp_path / "instances.json").write_text("{}")  # only checked to exist before the model
  other.data.eval_annotations, other.data.eval_images = str(tmp_path / "instances.json"), "."
  with pytest.raises(ValueError, match="different model config"):
    evaluator.evaluate_checkpoint(other, str(tmp_path))


def test_predict_files_refuses_another_runs_results_unless_overwrite(predictor, tmp_path):
  """A rerun into the same folder: refused; with ``overwrite`` the previous run's results.json
  and overlays go (none left stale), while files it did not write stay."""
  images = []
  for name in ("a.png", "b.png", "c.png"):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / name)
    images.append(str(tmp_path / name))
  out_dir = tmp_path / "out"
  first = inference.predict_files(predictor, images, str(out_dir))
  assert sorted(os.listdir(out_dir)) == ["0000_a.png", "0001_b.png", "0002_c.png", "results.json"]
  with open(first["results"]) as f:
    assert json.load(f)["complete"] is True
  (out_dir / "notes.txt").write_text("mine")
  (out_dir / "0005_z.png").write_bytes(b"not written by predict_files")
  with pytest.raises(ValueError, match=r"holds another run's results \(results.json and 3 "
                     r"overlays\); .* --overwrite"):
    inference.predict_files(predictor, images[2:], str(out_dir))
  assert len(os.listdir(out_dir)) == 6  # refused before touching anything

  second = inference.predict_files(predictor, images[2:], str(out_dir), overwrite=True)
  assert second["overlays"] == [str(out_dir / "0000_c.png")]
  assert sorted(os.listdir(out_dir)) == ["0000_c.png", "0005_z.png", "notes.txt", "results.json"]
  with open(second["results"]) as f:
    assert json.load(f)["images"] == ["c.png"]
