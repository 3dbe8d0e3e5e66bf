"""TFDS source on a tiny local builder with TFDS COCO features, built from the shapes set."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mrcnn_jax import data
from tests.data.conftest import decode_segmentation
from tests.data.conftest import small_config

_SHAPES_JSON = {}  # split -> (json path, image dir), set by the fixture before building


class FakeCocoShapes(tfds.core.GeneratorBasedBuilder):
  """coco/2017 features (+ coco/2017_panoptic's) over the synthetic shapes set."""

  VERSION = tfds.core.Version("1.0.0")

  # TFDS resolves a package-defined builder's source through `importlib_resources`, which
  # this environment lacks; a builder without a code path (as in Colab) skips that.
  code_path = None

  def _info(self):
    obj = lambda: tfds.features.Sequence({  # noqa: E731
        "id": np.int64, "bbox": tfds.features.BBoxFeature(), "is_crowd": np.bool_,
        "label": tfds.features.ClassLabel(names=["square", "circle", "triangle"])})
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="png"), "image/id": np.int64,
        "image/filename": tfds.features.Text(), "objects": obj(),
        "panoptic_image": tfds.features.Image(encoding_format="png"),
        "panoptic_objects": obj()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples("train"), "validation": self._generate_examples("val")}

  def _generate_examples(self, split):
    path, images = _SHAPES_JSON[split]
    with open(path) as f:
      d = json.load(f)
    label = {1: 0, 3: 1, 7: 2}
    for img in d["images"]:
      h, w = img["height"], img["width"]
      pan = np.zeros((h, w, 3), np.uint8)
      objects = []
      for a in (a for a in d["annotations"] if a["image_id"] == img["id"]):
        seg = a["segmentation"]
        m = decode_segmentation(seg, h, w).astype(bool)
        pid = a["id"]
        pan[m] = [pid % 256, (pid // 256) % 256, pid // 65536]
        x, y, bw, bh = a["bbox"]
        objects.append({"id": pid, "is_crowd": bool(a["iscrowd"]), "label": label[a["category_id"]],
                        "bbox": tfds.features.BBox(y / h, x / w, (y + bh) / h, (x + bw) / w)})
      image = np.asarray(Image.open(os.path.join(images, img["file_name"])).convert("RGB"))
      yield img["id"], {"image": image, "image/id": img["id"], "image/filename": img["file_name"],
                        "objects": objects, "panoptic_image": pan, "panoptic_objects": objects}


@pytest.fixture(scope="module")
def tfds_dir(shapes_dir, tmp_path_factory):
  _, paths = shapes_dir
  _SHAPES_JSON["train"] = (paths["train_annotations"], paths["train_images"])
  _SHAPES_JSON["val"] = (paths["eval_annotations"], paths["eval_images"])
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  FakeCocoShapes(data_dir=data_dir).download_and_prepare()
  return data_dir, paths


def _eval_by_id(pl):
  out = {}
  for b in pl:
    for i in np.flatnonzero(b["example_valid"]):
      out[int(b["image_id"][i])] = {k: v[i] for k, v in b.items()}
  return out


@pytest.mark.parametrize("masks", ["panoptic", "boxes"])
def test_tfds_eval_matches_coco_json(tfds_dir, masks):
  data_dir, paths = tfds_dir
  c = small_config(paths, source="tfds", tfds_name="fake_coco_shapes", tfds_data_dir=data_dir,
                   tfds_masks=masks)
  got = _eval_by_id(data.build_eval_dataset(c))
  want = _eval_by_id(data.build_eval_dataset(small_config(paths)))
  assert sorted(got) == sorted(want) and len(got) == 11
  filled = []
  for image_id, w in want.items():
    g = got[image_id]
    np.testing.assert_array_equal(g["gt_valid"], w["gt_valid"])
    np.testing.assert_array_equal(g["gt_classes"], w["gt_classes"])
    np.testing.assert_allclose(g["gt_boxes"], w["gt_boxes"], atol=1e-3)
    for key in ("original_size", "valid_size", "image_scale"):
      np.testing.assert_allclose(g[key], w[key])
    if masks == "panoptic":
      assert (g["gt_masks"] == w["gt_masks"]).mean() > 0.99
    else:
      filled.append(g["gt_masks"][g["gt_valid"]].reshape(-1))
  if masks == "boxes":
    assert np.concatenate(filled).mean() > 0.9  # box-filled


@pytest.mark.parametrize("mode, match", [("auto", "has no instance masks"),
                                         ("panoptic", "has no 'panoptic_image'"),
                                         ("polygons", "must be 'auto'")])
def test_tfds_mask_mode_without_panoptic_masks_is_refused(mode, match):
  """coco/2017 itself carries boxes only: 'auto' and 'panoptic' must refuse it (not train on
  empty masks), and an unknown mode is named."""
  import types  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  builder = types.SimpleNamespace(name="coco/2017",
                                  info=types.SimpleNamespace(features={"image": None}))
  config = types.SimpleNamespace(data=types.SimpleNamespace(tfds_masks=mode))
  with pytest.raises(ValueError, match=match):
    tfds_source._mask_mode(builder, config)  # pylint: disable=protected-access


def test_tfds_two_hosts_cover_eval(tfds_dir):
  data_dir, paths = tfds_dir
  c = small_config(paths, source="tfds", tfds_name="fake_coco_shapes", tfds_data_dir=data_dir)
  ids, counts = [], []
  for p in range(2):
    pl = data.build_eval_dataset(c, process_index=p, process_count=2)
    batches = list(pl)
    counts.append(len(batches))
    for b in batches:
      ids += b["image_id"][b["example_valid"]].tolist()
  assert counts[0] == counts[1] and len(ids) == len(set(ids)) == 11
  train = data.build_train_dataset(c, process_index=1, process_count=2)
  b = next(iter(train))
  assert b["image"].shape == (2, 64, 64, 3) and b["gt_valid"].any(axis=1).all()
  # Resume is exact when no record is filtered out at run time (here: keep empty images).
  c.data.skip_empty_train = False
  train = data.build_train_dataset(c, process_index=1, process_count=2)
  resumed = next(iter(data.build_train_dataset(c, process_index=1, process_count=2, start_step=1)))
  second = list(zip(range(2), train))[1][1]
  np.testing.assert_array_equal(resumed["image"], second["image"])
  assert train.categories.names == ["square", "circle", "triangle"]
