"""The synthetic shapes generator: determinism, COCO features it promises, speed."""

import filecmp
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_jax.data import shapes
from tests.data.conftest import decode_segmentation


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_deterministic_and_seed_dependent(tmp_path):
  a = shapes.generate(str(tmp_path / "a"), num_train=6, num_val=2, size=48, seed=1)
  b = shapes.generate(str(tmp_path / "b"), num_train=6, num_val=2, size=48, seed=1)
  c = shapes.generate(str(tmp_path / "c"), num_train=6, num_val=2, size=48, seed=2)
  assert _load(a["train_annotations"]) == _load(b["train_annotations"])
  assert _load(a["train_annotations"]) != _load(c["train_annotations"])
  names = sorted(os.listdir(a["train_images"]))
  match, mismatch, errors = filecmp.cmpfiles(a["train_images"], b["train_images"], names,
                                             shallow=False)
  assert match == names and not mismatch and not errors


def test_coco_features(shapes_dir):
  _, paths = shapes_dir
  d = _load(paths["train_annotations"])
  assert [c["id"] for c in d["categories"]] == [1, 3, 7]
  anns = d["annotations"]
  per_image = {img["id"]: 0 for img in d["images"]}
  for a in anns:
    per_image[a["image_id"]] += 1
  assert sum(v == 0 for v in per_image.values()) >= 2  # a few empty images
  assert max(per_image.values()) >= 3  # several instances per image
  assert {a["category_id"] for a in anns} == {1, 3, 7}
  segs = [a["segmentation"] for a in anns]
  assert any(isinstance(s, list) and len(s) == 1 for s in segs)
  assert any(isinstance(s, list) and len(s) > 1 for s in segs)  # several polygon parts
  assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs)
  assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)
  assert any(a["iscrowd"] for a in anns)
  files = [img["file_name"] for img in d["images"]]
  assert any(f.endswith(".jpg") for f in files) and any(f.endswith(".png") for f in files)
  # Overlapping boxes exist somewhere.
  boxes = {}
  for a in anns:
    boxes.setdefault(a["image_id"], []).append(a["bbox"])
  ious = [mask_utils.iou(b, b, [0] * len(b)) for b in boxes.values() if len(b) > 1]
  assert any((iou - np.eye(len(iou)) > 0.01).any() for iou in ious)


def test_image_pixels_match_annotations(shapes_dir):
  """PNG images are painted exactly where the (modal) non-crowd masks are."""
  _, paths = shapes_dir
  d = _load(paths["train_annotations"])
  checked = 0
  for img in d["images"]:
    if not img["file_name"].endswith(".png"):
      continue
    pixels = np.asarray(Image.open(os.path.join(paths["train_images"], img["file_name"])))
    background = pixels[0, 0]
    anns = [a for a in d["annotations"] if a["image_id"] == img["id"]]
    for a in anns:
      seg = a["segmentation"]
      h, w = img["height"], img["width"]
      m = decode_segmentation(seg, h, w).astype(bool)
      colours = np.unique(pixels[m].reshape(-1, 3), axis=0)
      if not a["iscrowd"]:
        assert len(colours) == 1, "a modal mask covers one flat colour"
        assert not (colours[0] == background).all() or m[0, 0]
        checked += 1
  assert checked > 5


def test_cli_is_fast(tmp_path):
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "mrcnn_jax.data.shapes", "--out", str(tmp_path), "--num_train",
                  "200", "--num_val", "10", "--size", "128", "--seed", "0"], check=True,
                 capture_output=True)
  assert time.time() - t0 < 20  # ~1 s on an idle core; margin for a loaded CI machine
  assert len(_load(tmp_path / "annotations" / "instances_train.json")["images"]) == 200
  assert len(os.listdir(tmp_path / "train")) == 200
