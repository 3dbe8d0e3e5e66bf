"""Bad input: each case is a counted skip ('skip') or a clear BadExampleError ('raise')."""

import json
import os
import shutil

import numpy as np
import pytest

from mrcnn_jax import data
from mrcnn_jax.data import coco as coco_lib
from tests.data.conftest import small_config


def _broken_copy(src_paths, out, case):
  """Copies the val split and breaks the first annotated image in one way."""
  with open(src_paths["eval_annotations"]) as f:
    d = json.load(f)
  images = os.path.join(out, "images")
  shutil.copytree(src_paths["eval_images"], images)
  first = d["annotations"][0]
  img = next(i for i in d["images"] if i["id"] == first["image_id"])
  path = os.path.join(images, img["file_name"])
  if case == "missing_image":
    os.remove(path)
  elif case == "corrupt_image":
    with open(path, "rb") as f:
      head = f.read(40)
    with open(path, "wb") as f:
      f.write(head)  # a truncated file with a valid header
  elif case == "image_size_mismatch":
    img["height"] += 3
    first["segmentation"] = [[1, 1, 5, 1, 5, 5]]
    for a in d["annotations"]:
      if a["image_id"] == img["id"] and isinstance(a["segmentation"], dict):
        a["segmentation"] = [[1, 1, 5, 1, 5, 5]]
  elif case == "bad_polygon":
    first["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # 2 points: pycocotools would read a box
  elif case == "unknown_category":
    first["category_id"] = 99
  elif case == "unknown_image_id":
    d["annotations"].append(dict(first, id=123456, image_id=424242))
  ann = os.path.join(out, "ann.json")
  with open(ann, "w") as f:
    json.dump(d, f)
  return ann, images, img["id"], len(d["images"])


LOAD_CASES = ["missing_image", "corrupt_image", "image_size_mismatch"]
BUILD_CASES = ["bad_polygon", "unknown_category", "unknown_image_id"]


@pytest.mark.parametrize("case", LOAD_CASES + BUILD_CASES)
def test_skip_counts_and_keeps_eval_slots(shapes_dir, tmp_path, case):
  _, paths = shapes_dir
  ann, images, bad_id, n_images = _broken_copy(paths, str(tmp_path), case)
  c = small_config(dict(paths, eval_annotations=ann, eval_images=images, train_annotations=ann,
                        train_images=images))
  ev = data.build_eval_dataset(c)
  batches = list(ev)
  valid = np.concatenate([b["example_valid"] for b in batches])
  ids = np.concatenate([b["image_id"] for b in batches])
  if case in LOAD_CASES:
    assert bad_id not in ids[valid] and valid.sum() == n_images - 1
  else:
    assert valid.sum() == n_images and bad_id in ids[valid]
  assert ev.stats.as_dict(), "the skip must be counted"
  reason = case if case != "bad_polygon" else "bad_annotation"
  assert ev.stats.as_dict().get(reason, 0) >= 1
  # Training never sees the broken image (unknown_image_id only loses the orphan annotation).
  tr = data.build_train_dataset(c)
  seen = np.concatenate([b["image_id"] for b in itertools_take(tr, 6)])
  assert (bad_id in seen) == (case == "unknown_image_id")


def itertools_take(p, n):
  it = iter(p)
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("case", BUILD_CASES)
def test_raise_at_construction(shapes_dir, tmp_path, case):
  _, paths = shapes_dir
  ann, images, _, _ = _broken_copy(paths, str(tmp_path), case)
  with pytest.raises(coco_lib.BadExampleError, match="annotation"):
    coco_lib.CocoSource(ann, images, training=True, on_bad_example="raise")


@pytest.mark.parametrize("case", LOAD_CASES)
def test_raise_at_load(shapes_dir, tmp_path, case):
  _, paths = shapes_dir
  ann, images, bad_id, _ = _broken_copy(paths, str(tmp_path), case)
  c = small_config(dict(paths, eval_annotations=ann, eval_images=images), on_bad_example="raise")
  with pytest.raises(coco_lib.BadExampleError, match=f"image {bad_id}"):
    list(data.build_eval_dataset(c))


def test_missing_annotation_file_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="annotation file"):
    coco_lib.CocoSource(str(tmp_path / "nope.json"), str(tmp_path), training=True)
  with pytest.raises(ValueError, match="on_bad_example"):
    coco_lib.CocoSource(str(tmp_path / "nope.json"), str(tmp_path), training=True,
                        on_bad_example="ignore")


@pytest.mark.parametrize("ann, problem", [
    ({"bbox": [0, 0, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "bbox"),
    ({"bbox": [0, 0, float("nan"), 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "bbox"),
    ({"bbox": [0, 0, -1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "negative"),
    ({"bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1]]}, "polygon"),
    ({"bbox": [0, 0, 1, 1], "segmentation": []}, "empty"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": [3, 2]}}, "sum"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [9, 9], "counts": "abc"}}, "size"),
    ({"bbox": [0, 0, 1, 1], "segmentation": None}, "segmentation"),
])
def test_check_annotation(ann, problem):
  assert problem in coco_lib.check_annotation(ann, 4, 5)
  ok = {"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": [3, 17]}}
  assert coco_lib.check_annotation(ok, 4, 5) is None
