"""CocoSource against pycocotools: masks (annToMask), boxes, crowd, empty images, categories."""

import contextlib
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_jax.data import coco as coco_lib


def _coco(path):
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(path)


@pytest.mark.parametrize("training", [True, False])
def test_targets_equal_pycocotools(shapes_dir, training):
  _, paths = shapes_dir
  key = "train" if training else "eval"
  oracle = _coco(paths[f"{key}_annotations"])
  src = coco_lib.CocoSource(paths[f"{key}_annotations"], paths[f"{key}_images"], training=training)
  ids = [r.image_id for r in src.records]
  all_ids = sorted(oracle.getImgIds())
  usable = {i for i in all_ids if oracle.getAnnIds(imgIds=i, iscrowd=False)}
  assert sorted(ids) == (sorted(usable) if training else all_ids)
  assert len(usable) < len(all_ids)  # the set has empty images, so skipping is exercised
  n_crowd = 0
  for index, rec in enumerate(src.records):
    ex = src.load(index)
    assert ex["ok"] and ex["image_id"] == rec.image_id
    info = oracle.loadImgs(rec.image_id)[0]
    assert ex["image"].shape == (info["height"], info["width"], 3)
    anns = oracle.loadAnns(oracle.getAnnIds(imgIds=rec.image_id))
    n_crowd += sum(a["iscrowd"] for a in anns)
    anns = [a for a in anns if not a["iscrowd"]]
    want_masks = np.stack([oracle.annToMask(a) for a in anns]) if anns else np.zeros((0,) + ex["image"].shape[:2])
    np.testing.assert_array_equal(ex["masks"], want_masks)
    want_boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                            a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32).reshape(-1, 4)
    np.testing.assert_allclose(ex["boxes"], want_boxes, rtol=1e-6)
    np.testing.assert_array_equal(
        src.categories.to_category_id(ex["classes"]) if len(anns) else [],
        [a["category_id"] for a in anns])
  assert n_crowd > 0  # crowd instances existed and were excluded


def test_category_map_round_trip():
  cats = coco_lib.CategoryMap([{"id": 7, "name": "c"}, {"id": 1, "name": "a"}, {"id": 3, "name": "b"}])
  assert cats.num_classes == 4 and cats.names == ["a", "b", "c"]
  np.testing.assert_array_equal(cats.to_contiguous([1, 3, 7, 7]), [1, 2, 3, 3])
  np.testing.assert_array_equal(cats.to_category_id([1, 2, 3]), [1, 3, 7])
  ids = np.array([7, 1, 3, 3, 1])
  np.testing.assert_array_equal(cats.to_category_id(cats.to_contiguous(ids)), ids)
  with pytest.raises(ValueError):
    cats.to_category_id([0])
  with pytest.raises(KeyError):
    cats.to_contiguous([2])
  with pytest.raises(coco_lib.BadExampleError):
    coco_lib.CategoryMap([{"id": 1}, {"id": 1}])


def test_decode_refuses_float_images(tmp_path):
  """A float TIFF in [0, 1] would convert to an all-black image: refused (a counted skip)."""
  path = str(tmp_path / "x.tif")
  Image.fromarray(np.full((9, 13), 0.75, np.float32), mode="F").save(path)
  with pytest.raises(ValueError, match="float image"):
    coco_lib.decode_image_rgb(path)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_decode_converts_to_rgb(tmp_path, rng, mode):
  rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
  if mode == "I;16":
    img = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).convert("I;16")
    want = np.repeat(rgb[..., :1], 3, axis=2)
  else:
    img = Image.fromarray(rgb).convert(mode)
    want = np.asarray(img.convert("RGB"))
  fmt = "JPEG" if mode == "CMYK" else "PNG"
  path = str(tmp_path / f"x.{fmt.lower()}")
  img.save(path, format=fmt, quality=100) if fmt == "JPEG" else img.save(path, format=fmt)
  got = coco_lib.decode_image_rgb(path)
  assert got.shape == (9, 13, 3) and got.dtype == np.uint8
  if fmt == "JPEG":  # lossy: close to the source RGB, not bit-exact
    assert np.abs(got.astype(int) - rgb.astype(int)).mean() < 12
  else:
    np.testing.assert_array_equal(got, want)
