"""Bad input: each case is a counted skip ('skip') or a clear BadExampleError ('raise')."""

import json
import os
import shutil

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
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
  elif case == "bad_rle":  # pycocotools.decode raises on this, inside tf.numpy_function
    first["segmentation"] = {"size": [img["height"], img["width"]], "counts": "!!!!garbage"}
  elif case == "unknown_category":
    first["category_id"] = 99
  elif case == "unknown_image_id":
    d["annotations"].append(dict(first, id=123456, image_id=424242))
  ann = os.path.join(out, "ann.json")
  with open(ann, "w") as f:
    json.dump(d, f)
  return ann, images, img["id"], len(d["images"])


LOAD_CASES = ["missing_image", "corrupt_image", "image_size_mismatch"]
BUILD_CASES = ["bad_polygon", "bad_rle", "unknown_category", "unknown_image_id"]


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
  reason = "bad_annotation" if case in ("bad_polygon", "bad_rle") else case
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


# A 4x5 mask with several runs (so a prefix is a truncated but well-formed string).
_VALID_4X5 = mask_utils.encode(np.asfortranarray(
    np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [1, 0, 0, 1, 1], [1, 1, 0, 0, 0]], np.uint8))
)["counts"].decode()


@pytest.mark.parametrize("ann, problem", [
    ({"bbox": [0, 0, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "bbox"),
    ({"bbox": [0, 0, float("nan"), 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "bbox"),
    ({"bbox": [0, 0, -1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "negative"),
    ({"bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1]]}, "polygon"),
    ({"bbox": [0, 0, 1, 1], "segmentation": []}, "empty"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": [3, 2]}}, "sum"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [9, 9], "counts": "abc"}}, "size"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": ["a", "b"], "counts": "abc"}}, "size"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": [-1, 21]}}, "negative"),
    # Compressed RLE that pycocotools decodes into uninitialised memory or fails on later.
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": "0"}}, "sum"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": _VALID_4X5[:2]}}, "sum"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": "!!!!garbage"}}, "valid"),
    ({"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": "2P"}}, "valid"),  # cut
    ({"bbox": [100, 100, 5, 5], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "outside"),
    ({"bbox": [-3, 0, 3, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "outside"),  # edge only
    ({"bbox": [0, 0, 1, 1], "segmentation": None}, "segmentation"),
])
def test_check_annotation(ann, problem):
  assert problem in coco_lib.check_annotation(ann, 4, 5)
  ok = {"bbox": [0, 0, 1, 1], "segmentation": {"size": [4, 5], "counts": [3, 17]}}
  assert coco_lib.check_annotation(ok, 4, 5) is None


def test_check_annotation_accepts_pycocotools_rle(rng):
  masks = [np.zeros((4, 5), np.uint8), np.ones((4, 5), np.uint8)]
  masks += [(rng.random((h, w)) < p).astype(np.uint8)
            for h, w, p in [(4, 5, 0.5), (37, 23, 0.1), (64, 48, 0.9), (300, 200, 0.5)]]
  big = np.zeros((900, 1000), np.uint8)  # long runs: multi-char counts
  big[200:700, 300:950] = 1
  masks.append(big)
  for m in masks:
    h, w = m.shape
    rle = mask_utils.encode(np.asfortranarray(m))
    for counts in (rle["counts"], rle["counts"].decode()):
      ann = {"bbox": [0, 0, w, h], "segmentation": {"size": [h, w], "counts": counts}}
      assert coco_lib.check_annotation(ann, h, w) is None


def _tiny_json(tmp_path, images, annotations, categories=({"id": 1, "name": "a"},)):
  """Writes a COCO JSON (and a 20x30 PNG per image) under tmp_path; returns (json, image dir)."""
  for img in images:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / img["file_name"])
  path = tmp_path / "ann.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": list(categories)}))
  return str(path), str(tmp_path)


def _ann(ann_id, image_id, **kw):
  return dict({"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [1, 1, 9, 9],
               "segmentation": [[1, 1, 10, 1, 10, 10]], "iscrowd": 0}, **kw)


def _img(image_id, file_name):
  return {"id": image_id, "file_name": file_name, "height": 20, "width": 30}


@pytest.mark.parametrize("category_id", [1.7, True, "1", None, [1]])
def test_non_integer_category_id_is_unknown(tmp_path, category_id):
  ann, images = _tiny_json(tmp_path, [_img(1, "a.png")], [_ann(1, 1, category_id=category_id)])
  src = coco_lib.CocoSource(ann, images, training=False)
  assert src.stats.as_dict().get("unknown_category") == 1
  assert src.records[0].classes == []  # not silently category 1
  with pytest.raises(coco_lib.BadExampleError, match="category id"):
    coco_lib.CocoSource(ann, images, training=False, on_bad_example="raise")


def test_integral_float_category_id_is_accepted(tmp_path):
  ann, images = _tiny_json(tmp_path, [_img(1, "a.png")], [_ann(1, 1, category_id=1.0)])
  src = coco_lib.CocoSource(ann, images, training=False)
  assert not src.stats.as_dict() and src.records[0].classes == [1]
  with pytest.raises(coco_lib.BadExampleError, match="category ids must be integers"):
    coco_lib.CategoryMap([{"id": "1", "name": "a"}])


def test_duplicate_image_ids_drop_every_entry(tmp_path):
  ann, images = _tiny_json(tmp_path, [_img(1, "a.png"), _img(2, "b.png"), _img(1, "c.png")],
                           [_ann(1, 1), _ann(2, 2), _ann(3, 1)])
  for training in (True, False):
    src = coco_lib.CocoSource(ann, images, training=training)
    assert [r.image_id for r in src.records] == [2]
    # Counted once, under its own reason (its annotations are not also "unknown_image_id").
    assert src.stats.as_dict() == {"duplicate_image_id": 1}
  with pytest.raises(coco_lib.BadExampleError, match="image id 1 appears 2 times"):
    coco_lib.CocoSource(ann, images, training=True, on_bad_example="raise")


def test_mask_decode_failure_at_load_is_a_counted_skip(tmp_path):
  ann, images = _tiny_json(tmp_path, [_img(1, "a.png")], [_ann(1, 1)])
  src = coco_lib.CocoSource(ann, images, training=False)
  assert src.load(0)["ok"]
  # Construction rejects such RLE; this stands for anything pycocotools still fails on.
  src.records[0].segmentations[0] = {"size": [20, 30], "counts": "!!!!garbage"}
  assert not src.load(0)["ok"]
  assert src.stats.as_dict() == {"bad_segmentation": 1}
  src.on_bad_example = "raise"
  with pytest.raises(coco_lib.BadExampleError, match="image 1: cannot decode its masks"):
    src.load(0)


def test_check_annotation_accepts_long_runs_and_zero_size_boxes_at_the_edge():
  """A run of 2**29+ pixels takes 7 chars (pycocotools reads it); a zero-width box at x = 0 is
  not "outside" (the transform drops it as degenerate, without losing its image)."""
  for h, w in [(30000, 20000), (40000, 30000)]:
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": [h * w]}, h, w)
    assert int(mask_utils.area(rle)) == 0
    ann = {"bbox": [0, 0, 5, 5], "segmentation": {"size": [h, w], "counts": rle["counts"]}}
    assert coco_lib.check_annotation(ann, h, w) is None
  for bbox, polygon in (([0, 5, 0, 3], [0, 5, 1, 5, 1, 8]), ([5, 0, 3, 0], [5, 0, 8, 0, 8, 1])):
    assert coco_lib.check_annotation({"bbox": bbox, "segmentation": [polygon]}, 20, 30) is None


@pytest.mark.parametrize("image_id", [1.5, True, "1", None])
def test_non_integer_image_id_is_a_bad_entry(tmp_path, image_id):
  ann, images = _tiny_json(tmp_path, [_img(1, "a.png"), _img(image_id, "b.png")],
                           [_ann(1, 1)])
  src = coco_lib.CocoSource(ann, images, training=False)
  assert [r.image_id for r in src.records] == [1]  # not a duplicate of image 1
  assert src.stats.as_dict() == {"bad_image_entry": 1}


_SQUARE = [[10, 10, 30, 10, 30, 30, 10, 30]]  # bounds x 10..30, y 10..30 (20 px sides)


@pytest.mark.parametrize("bbox, segmentation, ok", [
    ([10, 10, 20, 20], _SQUARE, True),
    ([11.9, 8.1, 20, 20], _SQUARE, True),  # within 2 px
    ([13, 10, 20, 20], _SQUARE, False),  # 3 px off: over 2 px and over 10% of 20 px
    ([10, 10, 20, 40], _SQUARE, False),  # twice as tall
    ([60, 60, 20, 20], _SQUARE, False),  # the right size, elsewhere
    ([10, 10, 1, 1], _SQUARE, False),  # a point in a 20 px polygon
    # 10% of a 80 px side is 8 px: 7 px off is agreement, 9 px is not.
    ([17, 10, 80, 80], [[10, 10, 90, 10, 90, 90, 10, 90]], True),
    ([19, 10, 80, 80], [[10, 10, 90, 10, 90, 90, 10, 90]], False),
    # The bounds of all parts; a part past the border counts up to the border.
    ([10, 10, 50, 50], [[10, 10, 20, 10, 20, 20], [50, 50, 60, 50, 60, 60]], True),
    ([10, 10, 10, 10], [[10, 10, 20, 10, 20, 20], [50, 50, 60, 50, 60, 60]], False),
    ([0, 0, 30, 30], [[-5, -5, 30, -5, 30, 30]], True),
    ([70, 0, 30, 20], [[70, 0, 130, 0, 130, 20]], True),
])
def test_bbox_must_agree_with_its_polygons(bbox, segmentation, ok):
  """Tolerance: each edge within max(2 px, 10% of the side) of the polygons' bounds, both
  clipped to the (100x100) image."""
  ann = {"bbox": bbox, "segmentation": segmentation}
  problem = coco_lib.annotation_problem(ann, 100, 100)
  if ok:
    assert problem is None
  else:
    assert problem[0] == "bbox_disagrees_with_segmentation" and "disagrees" in problem[1]


def test_bbox_far_from_its_polygon_is_a_counted_bad_annotation(tmp_path):
  ann, images = _tiny_json(tmp_path, [_img(1, "a.png")],
                           [_ann(1, 1), _ann(2, 1, bbox=[15, 1, 9, 9])])  # polygon at x 1..10
  src = coco_lib.CocoSource(ann, images, training=False)
  assert src.stats.as_dict() == {"bbox_disagrees_with_segmentation": 1}
  assert src.refused_annotations == {"bbox_disagrees_with_segmentation": 1}
  assert src.records[0].boxes_xywh == [[1.0, 1.0, 9.0, 9.0]]
  assert coco_lib.CocoSource(ann, images, training=True).records == []  # the image leaves
  with pytest.raises(coco_lib.BadExampleError, match="annotation 2 of image 1: bbox .* disagrees"):
    coco_lib.CocoSource(ann, images, training=False, on_bad_example="raise")


def test_shapes_annotations_agree_with_their_boxes(shapes_dir):
  _, paths = shapes_dir
  for key in ("train", "eval"):
    src = coco_lib.CocoSource(paths[f"{key}_annotations"], paths[f"{key}_images"], training=False)
    assert not src.refused_annotations and not src.stats.as_dict()


def test_ground_truth_holds_what_the_source_accepted(tmp_path):
  """Refused annotations leave the ground truth; a failed load is recorded by image id."""
  ann, images = _tiny_json(
      tmp_path, [_img(1, "a.png"), _img(2, "b.png"), _img(3, "c.png"), _img(3, "d.png")],
      [_ann(1, 1), _ann(2, 1, segmentation=[[50, 50, 55]]), _ann(3, 2), _ann(4, 9),
       _ann(5, 3), _ann(6, 1, category_id=5), _ann(7, 1, iscrowd=1)])
  os.remove(os.path.join(images, "b.png"))
  src = coco_lib.CocoSource(ann, images, training=False)
  gt = src.ground_truth()
  assert [i["id"] for i in gt["images"]] == [1, 2]
  assert [a["id"] for a in gt["annotations"]] == [1, 3, 7]  # crowd kept: COCOeval ignores it
  assert gt["categories"] == src.dataset["categories"]
  assert src.refused_annotations == {"bad_annotation": 1, "unknown_image_id": 1,
                                     "duplicate_image_id": 1, "unknown_category": 1}
  assert src.dropped_images == {"duplicate_image_id": 2}
  assert src.load(0)["ok"] and not src.load(1)["ok"]
  assert src.load_failures == {2: "missing_image"}
