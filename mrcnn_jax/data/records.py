"""Sharded record files for pod input: a COCO-format set converted once, read by offset.

Reading 118k small JPEGs per epoch from a bucket is slow (one request and one metadata look-up
per file), so :func:`write_records` packs a COCO instances JSON and its images (local or
``gs://``) into N TFRecord shards plus an index; :class:`RecordSource` serves them to the
pipeline exactly where :class:`~mrcnn_jax.data.coco.CocoSource` serves the JSON::

  write_records("gs://b/coco/annotations/instances_train2017.json", "gs://b/coco/train2017",
                "gs://b/records/train", num_shards=256)
  config.data.train_records = "gs://b/records/train.index.json"   # or the shards' pattern

Files (``PREFIX`` = the output prefix):

* ``PREFIX-00000-of-00256.tfrecord`` ...: one serialized ``tf.train.Example`` per image, the
  images in the JSON's order, cut into N contiguous runs. Features: ``image/encoded`` (the
  file's bytes as stored, never re-encoded), ``image/id``, ``image/height``, ``image/width``,
  ``image/filename``, and per annotation the JSON accepted (crowd ones included, in JSON order):
  ``image/object/id``, ``image/object/bbox`` (COCO ``[x, y, w, h]`` pixels, float32),
  ``image/object/category_id`` (the JSON's ids), ``image/object/is_crowd``,
  ``image/object/area``, ``image/object/segmentation`` (the polygon list or RLE dict as COCO
  JSON text, so polygon coordinates keep every digit), and with keypoints
  ``image/object/keypoints`` (K * 3 float32 each, zeros where an annotation has none).
* ``PREFIX.index.json``: per image its id, file name, size, shard, byte offset and length in
  the shard, whether an annotation of it was refused and how many usable instances it has, and
  why its image could not be used (missing, undecodable, wrong size: no bytes stored); the
  categories, keypoint names, shard names and sizes, and every bad entry found (reason,
  message), as the JSON source counts them.
* ``PREFIX.ground_truth.json``: the JSON as an evaluation source accepts it
  (:meth:`CocoSource.ground_truth`), which COCO evaluation reads, and the JSON's ``images``
  list as listed (evaluation's report counts them).

Design. The training stream is a pure function of ``(seed, step)`` that picks record indices
(:mod:`mrcnn_jax.data.pipeline`; with aspect-ratio buckets every host must agree on each
step's shape, known from the image sizes before anything is read) and resumes exactly at any
step. A :class:`RecordSource` has the same records, in the same order, with the same sizes as
the JSON source, so that plan is reused unchanged: every host builds the same schedule from the
small index and reads only the rows its slice of each global batch needs, each one ranged read
(``tf.io.gfile``, which speaks ``gs://``) on a file handle each loader thread keeps open per
shard (opening a ``gs://`` file costs a metadata request; on the emulator a kept handle's
150 KB read takes about a tenth of an open-and-read), issued in parallel by the pipeline's
parallel map. Streaming the shards with per-host file sharding would give each host a
different set of images per epoch and lose both the shared bucket schedule and the exact
resume. The image is decoded, and masks rasterised, by the same functions as the JSON source,
so the same images give the same batches, bit for bit. TFRecord rather than ArrayRecord: TF
reads and writes it on every file system it speaks with no new dependency, and the index gives
the random access ArrayRecord would.

Bad entries: the conversion builds the JSON source and decodes every image once, so the index
lists what the JSON source would skip (bad annotations at construction; missing, corrupt or
mis-sized images at load). A :class:`RecordSource` counts them in its
:class:`~mrcnn_jax.data.coco.DataStats` at the same moments and under the same reasons (an
image that failed at conversion fails again on each load, as a missing file does), and
training drops the same images.

Records written with keypoints (any category names them) have refused the annotations with bad
keypoints, also for a reader that leaves keypoints off.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import posixpath
import re
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from mrcnn_jax.data import coco as coco_lib

FORMAT = "mrcnn_jax.records/1"
INDEX_SUFFIX = ".index.json"
GROUND_TRUTH_SUFFIX = ".ground_truth.json"
_SHARD_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.tfrecord$")
# A TFRecord record: [length u64][masked crc32c of length u32][data][masked crc32c of data u32].
_HEADER_BYTES = 12
_FOOTER_BYTES = 4
# Open shard handles one loader thread keeps (least recently used closed first).
_HANDLES_PER_THREAD = 16

__all__ = ["ConversionReport", "RecordSource", "index_path", "shard_paths", "write_records"]


def _dirname(path: str) -> str:
  return posixpath.dirname(path) if "://" in path else os.path.dirname(path)


def shard_paths(prefix: str, num_shards: int) -> List[str]:
  """``PREFIX-00000-of-0000N.tfrecord`` ... for ``num_shards`` shards."""
  return [f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def index_path(spec) -> str:
  """The index file of ``config.data.train_records`` / ``eval_records``: an index path
  (``*.index.json``), the shards' file pattern, or a list of shard paths (or one string of them,
  comma-separated), all from one conversion. ``ValueError`` (one line) for anything else."""
  if isinstance(spec, str) and "," in spec:
    spec = [f.strip() for f in spec.split(",") if f.strip()]
  if isinstance(spec, (list, tuple)):
    files = [str(f) for f in spec]
  else:
    spec = str(spec)
    if spec.endswith(INDEX_SUFFIX):
      return spec
    files = sorted(tf.io.gfile.glob(spec)) if any(c in spec for c in "*?[") else [spec]
  if not files:
    raise FileNotFoundError(f"records: no file matches {spec!r}")
  prefixes = set()
  for f in files:
    m = _SHARD_RE.match(f)
    if not m:
      raise ValueError(f"records: {f!r} is neither an index ({INDEX_SUFFIX}) nor a shard "
                       "named PREFIX-NNNNN-of-NNNNN.tfrecord (scripts/make_records.py)")
    prefixes.add(m.group(1))
  if len(prefixes) > 1:
    raise ValueError(f"records: the files come from several conversions {sorted(prefixes)}")
  return prefixes.pop() + INDEX_SUFFIX


# --- writing ----------------------------------------------------------------------------------


def _bytes(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _ints(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _floats(values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _example(entry: Dict[str, Any], data: bytes, anns: Sequence[Dict[str, Any]],
             num_keypoints: int) -> bytes:
  """One image's ``tf.train.Example`` (module docstring), serialized."""
  features = {
      "image/encoded": _bytes([data]),
      "image/id": _ints([int(entry["id"])]),
      "image/height": _ints([int(entry["height"])]),
      "image/width": _ints([int(entry["width"])]),
      "image/filename": _bytes([str(entry["file_name"]).encode()]),
      "image/object/id": _ints([int(a.get("id") or 0) for a in anns]),
      "image/object/bbox": _floats([float(v) for a in anns for v in a["bbox"]]),
      "image/object/category_id": _ints([int(a["category_id"]) for a in anns]),  # integral
      "image/object/is_crowd": _ints([int(bool(a.get("iscrowd", 0))) for a in anns]),
      "image/object/area": _floats([float(a.get("area") or 0.0) for a in anns]),
      "image/object/segmentation": _bytes([json.dumps(a["segmentation"]).encode()
                                           for a in anns]),
  }
  if num_keypoints:
    features["image/object/keypoints"] = _floats(
        [float(v) for a in anns for v in coco_lib.parse_keypoints(a, num_keypoints).reshape(-1)])
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


@dataclasses.dataclass
class ConversionReport:
  """What :func:`write_records` wrote and what it found bad.

  ``problems``: ``(reason, message)`` of every bad entry, in the order the JSON source meets
  them (construction, then image loads in JSON order); ``counts``: reason -> how many.
  """
  index: str
  shards: List[str]
  num_images: int
  num_records: int
  bytes_written: int
  seconds: float
  problems: List[Tuple[str, str]]

  @property
  def counts(self) -> Dict[str, int]:
    return dict(collections.Counter(reason for reason, _ in self.problems))


def _num_keypoints_of(categories) -> int:
  names = [c.get("keypoints") for c in categories if isinstance(c, dict)]
  return max((len(n) for n in names if isinstance(n, (list, tuple))), default=0)


def write_records(annotation_file: str, image_dir: str, output_prefix: str, num_shards: int,
                  *, num_workers: int = 8) -> ConversionReport:
  """Converts a COCO instances JSON and its image folder into ``num_shards`` TFRecord shards,
  an index and the evaluation ground truth (module docstring); paths local or ``gs://``.

  Every image is read and decoded once (to find what the JSON source would skip) by
  ``num_workers`` threads, one shard at a time each. Keypoints are stored when the categories
  name them (K = the length of their lists).
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  start = time.perf_counter()
  try:
    categories = json.loads(coco_lib.read_file_bytes(annotation_file)).get("categories", [])
  except FileNotFoundError:
    raise FileNotFoundError(f"COCO annotation file not found: {annotation_file!r}") from None
  k = _num_keypoints_of(categories)
  # Evaluation mode keeps every image (training's choices are made per reader, from the index).
  source = coco_lib.CocoSource(annotation_file, image_dir, training=False, num_keypoints=k,
                               stats=coco_lib.DataStats())
  records = source.records
  anns_by_image = collections.defaultdict(list)
  for a in source.ground_truth()["annotations"]:
    anns_by_image[int(a["image_id"])].append(a)  # accepted: an id of an image entry
  n = len(records)
  num_shards = min(num_shards, max(n, 1))
  bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
  paths = shard_paths(output_prefix, num_shards)
  tf.io.gfile.makedirs(_dirname(output_prefix) or ".")

  def write_shard(s: int):
    rows, pos = [], 0
    with tf.io.TFRecordWriter(paths[s]) as writer:
      for i in range(bounds[s], bounds[s + 1]):
        rec = records[i]
        try:
          data = coco_lib.read_file_bytes(rec.path)
        except FileNotFoundError:
          data = None  # checked_image says so, in the JSON source's words
        _, problem = coco_lib.checked_image(rec, data)
        if problem is not None:
          rows.append((-1, 0, 0, problem))
          continue
        payload = _example(source.image_entry(rec.image_id), data,
                           anns_by_image.get(rec.image_id, []), k)
        writer.write(payload)
        rows.append((s, pos + _HEADER_BYTES, len(payload), None))
        pos += _HEADER_BYTES + len(payload) + _FOOTER_BYTES
    size = tf.io.gfile.stat(paths[s]).length
    if size != pos:
      raise OSError(f"records: {paths[s]} has {size} bytes, expected {pos}")
    return rows, pos

  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    results = list(pool.map(write_shard, range(num_shards)))
  rows = [r for shard_rows, _ in results for r in shard_rows]
  load_problems = [(i, r[3]) for i, r in enumerate(rows) if r[3] is not None]
  problems = list(source.construction_problems) + [p for _, p in load_problems]
  index = {
      "format": FORMAT,
      "annotation_file": str(annotation_file), "image_dir": str(image_dir),
      "num_keypoints": k,
      "categories": categories,
      "shards": [posixpath.basename(p) for p in paths],
      "shard_bytes": [size for _, size in results],
      "refused_annotations": dict(source.refused_annotations),
      "dropped_images": dict(source.dropped_images),
      "construction_problems": [list(p) for p in source.construction_problems],
      "images": {
          "id": [r.image_id for r in records],
          "file_name": [source.image_entry(r.image_id)["file_name"] for r in records],
          "height": [r.height for r in records],
          "width": [r.width for r in records],
          "shard": [r[0] for r in rows],
          "offset": [r[1] for r in rows],
          "length": [r[2] for r in rows],
          "bad_annotations": [int(r.image_id in source.images_with_bad_annotations)
                              for r in records],
          "num_usable": [len(r.classes) for r in records],
      },
      "load_failures": {str(i): list(p) for i, p in load_problems},
  }
  index_file = output_prefix + INDEX_SUFFIX
  with tf.io.gfile.GFile(output_prefix + GROUND_TRUTH_SUFFIX, "w") as f:
    json.dump({"ground_truth": source.ground_truth(),
               "listed_images": source.dataset.get("images", [])}, f)
  with tf.io.gfile.GFile(index_file, "w") as f:  # last: its presence means a finished conversion
    json.dump(index, f)
  return ConversionReport(index=index_file, shards=paths, num_images=n,
                          num_records=sum(1 for r in rows if r[0] >= 0),
                          bytes_written=sum(size for _, size in results),
                          seconds=time.perf_counter() - start, problems=problems)


# --- reading ----------------------------------------------------------------------------------


class _ShardReader:
  """Ranged reads from the shards; each thread keeps its own open handles (an LRU per thread),
  so parallel loads never share a file position."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self._local = threading.local()

  def read(self, shard: int, offset: int, length: int) -> bytes:
    handles = getattr(self._local, "handles", None)
    if handles is None:
      handles = self._local.handles = collections.OrderedDict()
    f = handles.pop(shard, None)
    if f is None:
      f = tf.io.gfile.GFile(self.paths[shard], "rb")
      while len(handles) >= _HANDLES_PER_THREAD:
        handles.popitem(last=False)[1].close()
    handles[shard] = f
    f.seek(offset - _HEADER_BYTES)
    blob = f.read(_HEADER_BYTES + length)
    if len(blob) != _HEADER_BYTES + length or struct.unpack("<Q", blob[:8])[0] != length:
      raise OSError(f"records: {self.paths[shard]} has no record of {length} bytes at "
                    f"{offset}: the index does not belong to this shard")
    return blob[_HEADER_BYTES:]


def _read_json(path: str, what: str):
  try:
    return json.loads(coco_lib.read_file_bytes(path))
  except FileNotFoundError:
    raise FileNotFoundError(f"records: {what} not found: {path} (written by "
                            "scripts/make_records.py)") from None


class RecordSource:
  """Random-access examples from :func:`write_records`' files, a drop-in for
  :class:`~mrcnn_jax.data.coco.CocoSource` built on the same JSON and images: the same
  ``records`` (ids, sizes, order), ``load`` results, skip counts and ``ground_truth()``.

  Args:
    records: the index path, the shards' file pattern or a list of shards (:func:`index_path`).
    training, skip_empty, on_bad_example, stats, num_keypoints: as for ``CocoSource``
      (``num_keypoints`` must be 0 or the K the records were written with).
  """

  def __init__(self, records, *, training: bool, skip_empty: bool = True,
               on_bad_example: str = "skip", stats: Optional[coco_lib.DataStats] = None,
               num_keypoints: int = 0):
    if on_bad_example not in ("skip", "raise"):
      raise ValueError(f"on_bad_example must be 'skip' or 'raise', got {on_bad_example!r}")
    self.index_file = index_path(records)
    index = _read_json(self.index_file, "index")
    if index.get("format") != FORMAT:
      raise ValueError(f"records: {self.index_file} is not a {FORMAT} index")
    self.training = training
    self.on_bad_example = on_bad_example
    self.stats = stats if stats is not None else coco_lib.DataStats()
    folder = _dirname(self.index_file)
    self._reader = _ShardReader([coco_lib.join_path(folder, s) for s in index["shards"]])
    self._check_shards(index["shard_bytes"])
    self.image_dir = index["image_dir"]
    categories = index["categories"]
    self.categories = coco_lib.CategoryMap(categories)
    self.num_keypoints = int(num_keypoints)
    if self.num_keypoints and self.num_keypoints != index["num_keypoints"]:
      raise ValueError(f"records {self.index_file} hold {index['num_keypoints']} keypoints per "
                       f"instance, config.model.keypoint.num_keypoints is {self.num_keypoints}")
    self.keypoint_names: Tuple[str, ...] = (
        coco_lib.keypoint_names(categories, self.num_keypoints, self.index_file)
        if self.num_keypoints else ())
    self.refused_annotations = collections.Counter(index["refused_annotations"])
    self.dropped_images = collections.Counter(index["dropped_images"])
    self.load_failures: Dict[int, str] = {}
    self._gt = None
    for reason, message in index["construction_problems"]:  # as CocoSource counted them
      if on_bad_example == "raise":
        self.stats.last_error = message
        raise coco_lib.BadExampleError(message)
      self.stats.count(reason, message)
    self._build_records(index, skip_empty)

  def _check_shards(self, sizes: Sequence[int]) -> None:
    def length(path):
      try:
        return tf.io.gfile.stat(path).length
      except tf.errors.NotFoundError:
        return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # one metadata request per shard
      lengths = list(pool.map(length, self._reader.paths))
    for path, size, actual in zip(self._reader.paths, sizes, lengths):
      if actual is None:
        raise FileNotFoundError(f"records: shard not found: {path} (listed in "
                                f"{self.index_file})")
      if actual != size:
        raise ValueError(f"records: {path} has {actual} bytes, its index says {size} (a shard "
                         "from another conversion?)")

  def _build_records(self, index, skip_empty: bool) -> None:
    cols = index["images"]
    failures = index["load_failures"]
    self.records: List[coco_lib.ImageRecord] = []
    self._rows: List[Tuple[int, int, int, Optional[Tuple[str, str]]]] = []
    for i, image_id in enumerate(cols["id"]):
      if self.training and cols["bad_annotations"][i]:
        self.stats.count("image_with_bad_annotation", f"training skips image {image_id} "
                         "because one of its annotations is bad")
        continue
      if self.training and skip_empty and not cols["num_usable"][i]:
        continue
      self.records.append(coco_lib.ImageRecord(
          image_id=image_id, path=coco_lib.join_path(self.image_dir, cols["file_name"][i]),
          height=cols["height"][i], width=cols["width"][i], boxes_xywh=[], classes=[],
          segmentations=[]))
      failure = failures.get(str(i))
      self._rows.append((cols["shard"][i], cols["offset"][i], cols["length"][i],
                         tuple(failure) if failure else None))

  def __len__(self) -> int:
    return len(self.records)

  def _ground_truth_file(self) -> Tuple[Dict[str, Any], List[Any]]:
    if self._gt is None:
      content = _read_json(self.index_file[:-len(INDEX_SUFFIX)] + GROUND_TRUTH_SUFFIX,
                           "ground truth")
      self._gt = (content["ground_truth"], content["listed_images"])
    return self._gt

  @property
  def dataset(self) -> Dict[str, Any]:
    """As ``CocoSource.dataset``, for reports: the JSON's top-level keys and ``images`` list as
    the conversion read them, its accepted annotations (read on first use)."""
    gt, listed = self._ground_truth_file()
    return dict(gt, images=listed)

  def ground_truth(self) -> Dict[str, Any]:
    """As :meth:`CocoSource.ground_truth`: the served images and their accepted annotations."""
    gt, _ = self._ground_truth_file()
    served = {r.image_id for r in self.records}
    return dict(gt, images=[e for e in gt["images"] if e["id"] in served],
                annotations=[a for a in gt["annotations"] if a.get("image_id") in served])

  def read_record(self, index: int) -> bytes:
    """The serialized ``tf.train.Example`` of record ``index`` (one ranged read)."""
    shard, offset, length, _ = self._rows[index]
    return self._reader.read(shard, offset, length)

  def load(self, index: int) -> Dict[str, np.ndarray]:
    """As :meth:`CocoSource.load`: example ``index`` (-1: a padding slot), numpy, original
    pixels."""
    index = int(index)
    if index < 0:
      return coco_lib.placeholder_example(self.num_keypoints)
    rec = self.records[index]
    failure = self._rows[index][3]
    if failure is not None:
      return self._bad_load(rec, *failure)
    features = tf.train.Example.FromString(self.read_record(index)).features.feature
    crowd = list(features["image/object/is_crowd"].int64_list.value)
    keep = [i for i, c in enumerate(crowd) if not c]
    bbox = features["image/object/bbox"].float_list.value
    segs = features["image/object/segmentation"].bytes_list.value
    cats = features["image/object/category_id"].int64_list.value
    rec = dataclasses.replace(
        rec, boxes_xywh=[list(bbox[4 * i:4 * i + 4]) for i in keep],
        classes=[int(c) for c in self.categories.to_contiguous([cats[i] for i in keep])],
        segmentations=[json.loads(segs[i]) for i in keep], num_crowd=len(crowd) - len(keep))
    if self.num_keypoints:
      kp = np.asarray(features["image/object/keypoints"].float_list.value, np.float32)
      kp = kp.reshape(len(crowd), self.num_keypoints, 3)
      rec.keypoints = [kp[i] for i in keep]
    image, problem = coco_lib.checked_image(
        rec, data=features["image/encoded"].bytes_list.value[0])
    if problem is None:
      ex, problem = coco_lib.example_from(rec, image, self.num_keypoints)
    if problem is not None:
      return self._bad_load(rec, *problem)
    return ex

  def _bad_load(self, rec: coco_lib.ImageRecord, reason: str, message: str):
    self.load_failures[rec.image_id] = reason
    if self.on_bad_example == "raise":
      self.stats.last_error = message
      raise coco_lib.BadExampleError(message)
    self.stats.count(reason, message)
    return coco_lib.placeholder_example(self.num_keypoints)


def log_report(report: ConversionReport, max_lines: int = 20) -> None:
  """Logs a conversion's summary and its first ``max_lines`` bad entries."""
  logging.info("records: %d images -> %d records in %d shards (%.1f MB) in %.1f s; skips: %s",
               report.num_images, report.num_records, len(report.shards),
               report.bytes_written / 1e6, report.seconds, report.counts or "none")
  for reason, message in report.problems[:max_lines]:
    logging.warning("records: %s (%s)", message, reason)
