"""COCO instances JSON + image folder: parsing, validation, category mapping, host-side loading.

:class:`CocoSource` reads a COCO instances JSON once, validates every annotation up front (so a
bad polygon or an unknown id is reported with its ids, not as an error deep inside TensorFlow)
and then loads one example at a time by index with :meth:`CocoSource.load`: the image decoded
by PIL (JPEG/PNG/...; grayscale, palette, RGBA, CMYK and 16-bit converted to RGB) and each
instance's full-size binary mask decoded by pycocotools exactly as ``COCO.annToMask`` does.
The tf.data pipeline (:mod:`mrcnn_jax.data.pipeline`) calls ``load`` through
``tf.numpy_function``; the geometric transforms then run in TensorFlow. The JSON and the images
are read through etils ``epath`` (``tf.io.gfile`` for URLs), so either may be a local path or a
``gs://`` URL; a missing image is a ``missing_image`` skip on both.

Target rules:

* ``iscrowd`` annotations never enter the targets (COCO evaluation reads them from the JSON).
* COCO's sparse category ids map to contiguous ids 1..K in increasing id order
  (:class:`CategoryMap`); 0 is background/padding.
* Boxes come from each annotation's ``bbox`` (``[x, y, w, h]``), converted to xyxy pixels.
* Training skips images without a usable instance (``skip_empty``); evaluation keeps all.
* Keypoints (``num_keypoints`` = K > 0, COCO person_keypoints-style JSON): the categories'
  ``keypoints`` lists name the K points (every category that has one must give the same names,
  and K must match, else a ``ValueError`` naming the file); each annotation's ``keypoints``
  ``[x1, y1, v1, ...]`` becomes [K, 3] float32 (x, y, v) in original pixels, zeros when the
  annotation has none (a category without keypoints). With K = 0 keypoints are not read.

Bad input, with ``on_bad_example='skip'`` (counted in :class:`DataStats`, logged) or ``'raise'``
(:class:`BadExampleError`): an image id listed more than once in ``images`` (all its entries and
annotations are dropped); an annotation whose image id or category id is unknown (a category id
must be an int or an integral float: 1.7, True or "1" are unknown), whose polygon/RLE/bbox is
malformed (an RLE's counts must be non-negative and sum to height*width; a bbox must overlap the
image; a polygon's bbox must agree with the polygons' bounds, see :func:`check_annotation`),
or, with keypoints on, whose ``keypoints`` are not 3K finite numbers with v in {0, 1, 2}
(``bad_keypoints``, :func:`keypoints_problem`) (checked at construction); an image file that is
missing, cannot be decoded or whose size differs from the JSON, or masks pycocotools cannot
decode (checked at load). In training a bad
annotation removes its whole image (a partly labelled image would teach "object =
background"); in evaluation the image is kept and only the bad annotation leaves the batch
targets and the ground truth (:meth:`CocoSource.ground_truth`), and an image that fails to load
is recorded in :attr:`CocoSource.load_failures` so that evaluation can leave it out.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import numbers
import os
import posixpath
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError
from pycocotools import mask as mask_utils


class BadExampleError(ValueError):
  """A data set entry that cannot be turned into a correct example."""


class DataStats:
  """Thread-safe counters of skipped examples/annotations and truncated instances, by reason."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()
    self.last_error: Optional[str] = None

  def count(self, reason: str, message: str, n: int = 1) -> None:
    with self._lock:
      self.counts[reason] += n
      total = self.counts[reason]
      self.last_error = message
    if total <= 5 or total % 100 == 0:  # rate-limited: the first few, then every 100th
      logging.warning("data: %s (%s #%d)", message, reason, total)

  def as_dict(self) -> Dict[str, int]:
    with self._lock:
      return dict(self.counts)


def _as_int(value) -> Optional[int]:
  """``value`` (an id or a size) as an int; None unless an int (not bool) or an integral float.

  Integral floats (``1.0``) are accepted because JSON written via float columns (pandas, JS) has
  them, and ``1.0`` already matches image id 1 in a dict lookup; ``int()`` would also turn 1.7,
  True or "1" into 1, silently relabelling an instance.
  """
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return int(value)
  if isinstance(value, float) and value.is_integer():
    return int(value)
  return None


class CategoryMap:
  """COCO category ids <-> contiguous class ids 1..K (0 = background), in increasing id order."""

  def __init__(self, categories: Sequence[Dict[str, Any]]):
    bad = [c.get("id") for c in categories if _as_int(c.get("id")) is None]
    if bad:
      raise BadExampleError(f"category ids must be integers, got {bad!r}")
    cats = sorted(categories, key=lambda c: _as_int(c["id"]))
    self.category_ids: List[int] = [_as_int(c["id"]) for c in cats]
    if len(set(self.category_ids)) != len(cats):
      raise BadExampleError(f"duplicate category ids in {self.category_ids}")
    self.names: List[str] = [str(c.get("name", c["id"])) for c in cats]
    self._to_contiguous = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

  @property
  def num_classes(self) -> int:
    """K + 1: the foreground classes plus background, the model's ``num_classes``."""
    return len(self.category_ids) + 1

  def __contains__(self, category_id) -> bool:
    return _as_int(category_id) in self._to_contiguous

  def to_contiguous(self, category_ids) -> np.ndarray:
    """COCO ids [...] -> int32 contiguous ids in 1..K (KeyError on an unknown or non-integer id)."""
    ids = np.asarray(category_ids)
    return np.vectorize(lambda c: self._to_contiguous[_as_int(c)], otypes=[np.int32])(ids) \
        if ids.size else ids.astype(np.int32)

  def to_category_id(self, contiguous) -> np.ndarray:
    """Contiguous ids 1..K [...] -> int64 COCO category ids (ValueError outside 1..K)."""
    c = np.asarray(contiguous, np.int64)
    if c.size and (c.min() < 1 or c.max() > len(self.category_ids)):
      raise ValueError(f"contiguous class ids must lie in 1..{len(self.category_ids)}, got {c}")
    return np.asarray(self.category_ids, np.int64)[c - 1]


def _read_annotation_file(path: str) -> bytes:
  try:
    return read_file_bytes(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"COCO annotation file not found: {path!r}") from None


def _finite_numbers(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             for v in values)


def _rle_string_counts(s: str) -> Optional[List[int]]:
  """The run lengths in a compressed COCO RLE string, read as pycocotools' C ``rleFrString`` does.

  Each count is little-endian 5-bit groups, one per char (value = char - 48; bit 0x20: another
  group follows; bit 0x10 of the last group: negative); from the 4th count on the string holds
  the difference to the count two before. Returns None for a char outside '0'..'o', a string
  ending inside a count, or a count whose groups the C decoder's int shift cannot hold (an 8th
  group, or a 7th above 1): C reads past the string's end or garbage bits there instead of
  failing. Pure Python; it runs once per RLE annotation, at construction.
  """
  counts = []
  value = shift = 0
  for ch in s:
    c = ord(ch) - 48
    if not 0 <= c < 64 or shift > 30 or (shift == 30 and (c & 0x1f) > 1):
      return None
    value |= (c & 0x1f) << shift
    shift += 5
    if c & 0x20:
      continue
    if c & 0x10:
      value -= 1 << shift  # sign extension
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
    value = shift = 0
  return None if shift else counts


def _check_rle_counts(counts, height: int, width: int) -> Optional[str]:
  """Why RLE ``counts`` (a list or a compressed str/bytes) is unusable, or None.

  pycocotools decodes counts that do not sum to height*width without an error, into a mask with
  uninitialised memory (different garbage each call), so the sum is checked here.
  """
  if isinstance(counts, (str, bytes)):
    # latin-1 maps each byte to one char, so a non-ascii byte is rejected like any bad char.
    runs = _rle_string_counts(counts.decode("latin-1") if isinstance(counts, bytes) else counts)
    if runs is None:
      return f"compressed RLE counts {counts[:20]!r} are not a valid RLE string"
    kind = "compressed"
  elif isinstance(counts, list):
    runs, kind = counts, "uncompressed"
  else:
    return f"RLE counts must be a list or a string, got {type(counts).__name__}"
  if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in runs):
    return f"{kind} RLE counts must be non-negative ints"
  if sum(runs) != height * width:
    return f"{kind} RLE counts sum to {sum(runs)}, not height*width = {height * width}"
  return None


# A polygon's bbox may differ from the polygons' bounds by rasterisation (COCO's bboxes are the
# mask's, up to ~1 px off the polygon); this much more than that is a wrong label.
BBOX_TOLERANCE_PX = 2.0
BBOX_TOLERANCE_FRACTION = 0.1


def _bbox_polygon_problem(bbox, parts, height: int, width: int) -> Optional[str]:
  """Why ``bbox`` ([x, y, w, h]) disagrees with the bounds of polygon ``parts``, or None.

  Both boxes are clipped to the image first (a polygon may reach past the border; its mask and
  bbox stop there). Disagreement: an edge more than ``max(BBOX_TOLERANCE_PX,
  BBOX_TOLERANCE_FRACTION * side)`` from the bounds' edge, ``side`` being the larger of the two
  boxes' extents along that axis.
  """
  xs = [v for p in parts for v in p[0::2]]
  ys = [v for p in parts for v in p[1::2]]
  x, y, w, h = bbox
  limits = np.array([width, height, width, height], np.float64)
  box = np.clip(np.array([x, y, x + w, y + h], np.float64), 0.0, limits)
  poly = np.clip(np.array([min(xs), min(ys), max(xs), max(ys)], np.float64), 0.0, limits)
  side = np.maximum(box[2:] - box[:2], poly[2:] - poly[:2])  # [x extent, y extent]
  tolerance = np.maximum(BBOX_TOLERANCE_PX, BBOX_TOLERANCE_FRACTION * np.tile(side, 2))
  if np.any(np.abs(box - poly) > tolerance):
    bounds = [round(float(v), 2) for v in (poly[0], poly[1], poly[2] - poly[0], poly[3] - poly[1])]
    return (f"bbox {list(bbox)} disagrees with its polygons' bounds {bounds} (xywh) by more than "
            f"max({BBOX_TOLERANCE_PX:g} px, {BBOX_TOLERANCE_FRACTION:.0%} of the side)")
  return None


def annotation_problem(ann: Dict[str, Any], height: int, width: int):
  """``(reason, message)`` saying why ``ann`` cannot be used, or None when it is fine.

  ``reason`` is ``'bbox_disagrees_with_segmentation'`` for a polygon annotation whose bbox is
  far from the polygons' bounds (tolerance: :func:`_bbox_polygon_problem`; RLE masks are not
  compared), else ``'bad_annotation'`` (a malformed bbox, polygon or RLE).
  """
  bbox = ann.get("bbox")
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not _finite_numbers(bbox):
    return "bad_annotation", f"bbox must be 4 finite numbers, got {bbox!r}"
  x, y, w, h = bbox
  if w < 0 or h < 0:
    return "bad_annotation", f"bbox has negative width/height: {bbox}"
  # Pixel columns [x, x + w) must meet [0, width) (rows likewise); a box wholly off the image
  # cannot be a label of it. (A zero-size side inside the image is left to the transform,
  # which drops boxes under 1 px.)
  if x >= width or y >= height or (w > 0 and x + w <= 0) or (h > 0 and y + h <= 0):
    return "bad_annotation", f"bbox {bbox} lies outside the {width}x{height} image"
  seg = ann.get("segmentation")
  if isinstance(seg, list):
    if not seg:
      return "bad_annotation", "empty polygon list"
    for part in seg:
      # pycocotools reads a length-4 list as a *box*, so 2-point polygons must be rejected here.
      if not isinstance(part, list) or len(part) < 6 or len(part) % 2 or not _finite_numbers(part):
        shown = part if not isinstance(part, list) or len(part) <= 8 else part[:8] + ["..."]
        return "bad_annotation", f"bad polygon part {shown!r} (need >= 3 finite (x, y) pairs)"
    problem = _bbox_polygon_problem(bbox, seg, height, width)
    return None if problem is None else ("bbox_disagrees_with_segmentation", problem)
  if isinstance(seg, dict):
    size = seg.get("size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
        or [_as_int(s) for s in size] != [height, width]):
      return "bad_annotation", f"RLE size {size!r} differs from the image size {[height, width]}"
    problem = _check_rle_counts(seg.get("counts"), height, width)
    return None if problem is None else ("bad_annotation", problem)
  return ("bad_annotation",
          f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}")


def keypoints_problem(ann: Dict[str, Any], num_keypoints: int) -> Optional[str]:
  """Why ``ann``'s ``keypoints`` cannot be used with K = ``num_keypoints``, or None.

  Absent (or null) keypoints are fine (the annotation has none); present ones must be 3K finite
  numbers ``[x1, y1, v1, ...]`` with every v in {0, 1, 2} (COCO: not labelled, labelled but not
  visible, visible).
  """
  kp = ann.get("keypoints")
  if kp is None:
    return None
  if not isinstance(kp, (list, tuple)) or len(kp) != 3 * num_keypoints:
    got = f"{len(kp)} values" if isinstance(kp, (list, tuple)) else type(kp).__name__
    return f"keypoints must be a list of 3 * {num_keypoints} numbers (x, y, v), got {got}"
  if not _finite_numbers(kp):
    return "keypoints must be finite numbers"
  bad = [v for v in kp[2::3] if v not in (0, 1, 2)]
  if bad:
    return f"keypoint visibility must be 0, 1 or 2, got {bad[:5]}"
  return None


def parse_keypoints(ann: Dict[str, Any], num_keypoints: int) -> np.ndarray:
  """[K, 3] float32 (x, y, v) of an annotation that passed :func:`keypoints_problem`."""
  kp = ann.get("keypoints")
  if kp is None:
    return np.zeros((num_keypoints, 3), np.float32)
  return np.asarray(kp, np.float32).reshape(num_keypoints, 3)


def keypoint_names(categories: Sequence[Dict[str, Any]], num_keypoints: int,
                   annotation_file: str) -> Tuple[str, ...]:
  """The K keypoint names the categories of ``annotation_file`` list; ``ValueError`` unless
  they list one set of ``num_keypoints`` distinct names (categories without a list are fine)."""
  lists = set()
  for c in categories:
    names = c.get("keypoints")
    if names is None:
      continue
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
      raise ValueError(f"{annotation_file}: category {c.get('id')!r} has 'keypoints' {names!r}; "
                       "expected a list of keypoint names")
    if names:
      lists.add(tuple(names))
  if not lists:
    raise ValueError(f"{annotation_file}: keypoints are on (config.model.keypoint.enabled, "
                     f"num_keypoints={num_keypoints}) but no category lists keypoint names: use "
                     "a person_keypoints-style JSON (e.g. `python -m mrcnn_jax.data.shapes "
                     "--keypoints`)")
  if len(lists) > 1:
    raise ValueError(f"{annotation_file}: the categories list different keypoint names "
                     f"{sorted(lists)}; one keypoint head predicts one set")
  names = lists.pop()
  if len(set(names)) != len(names):
    raise ValueError(f"{annotation_file}: repeated keypoint names in {list(names)}")
  if len(names) != num_keypoints:
    raise ValueError(f"{annotation_file}: the categories name {len(names)} keypoints "
                     f"{list(names)} but config.model.keypoint.num_keypoints = {num_keypoints}")
  return names


def check_annotation(ann: Dict[str, Any], height: int, width: int) -> Optional[str]:
  """Returns why ``ann`` cannot be used (bbox / segmentation checks), or None when it is fine.

  The checks and the bbox-vs-polygon tolerance are :func:`annotation_problem`'s.
  """
  problem = annotation_problem(ann, height, width)
  return None if problem is None else problem[1]


def segmentation_to_rle(seg, height: int, width: int) -> Dict[str, Any]:
  """One compressed RLE for a COCO segmentation (polygon parts, uncompressed or compressed RLE)."""
  if isinstance(seg, list):
    return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
  if isinstance(seg["counts"], list):
    return mask_utils.frPyObjects(seg, height, width)
  counts = seg["counts"]
  return {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str)
          else counts}


def join_path(folder: str, name: str) -> str:
  """``os.path.join`` for a local folder, ``/``-joined for a URL (``gs://b/train``)."""
  return posixpath.join(folder, name) if "://" in str(folder) else os.path.join(folder, name)


@dataclasses.dataclass
class ImageRecord:
  """One image and its usable (non-crowd, valid) annotations."""
  image_id: int
  path: str
  height: int
  width: int
  boxes_xywh: List[List[float]]
  classes: List[int]  # contiguous 1..K
  segmentations: List[Any]
  num_crowd: int = 0
  keypoints: List[np.ndarray] = dataclasses.field(default_factory=list)  # [K, 3] each; K > 0


_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I")


def _png_significant_bits(f) -> Optional[int]:
  """The first byte of a PNG's sBIT chunk (gray samples' significant bits), or None.

  PIL reads sBIT but does not expose it; the chunk precedes IDAT, so the scan is short.
  """
  f.seek(8)  # past the PNG signature
  while True:
    head = f.read(8)
    if len(head) < 8 or head[4:] in (b"IDAT", b"IEND"):
      return None
    length = int.from_bytes(head[:4], "big")
    if head[4:] == b"sBIT":
      data = f.read(length)
      return data[0] if data else None
    f.seek(length + 4, 1)  # the chunk's data and CRC


def _gray16_full_scale(a: np.ndarray, significant_bits: Optional[int]) -> int:
  """The sample value that maps to 255 in a 16-bit grayscale image (see decode_image_rgb)."""
  if not significant_bits or significant_bits >= 16:
    return 65535
  low = (1 << significant_bits) - 1
  # The PNG spec's layout: samples shifted to the high bits, low bits zero (or replicated).
  shifted = a.max(initial=0) > low or not np.any(a % (1 << (16 - significant_bits)))
  return 65535 if shifted else low


def read_file_bytes(path: str) -> bytes:
  """The bytes of the file ``path``, local or a URL (``gs://``); ``FileNotFoundError`` when it
  is missing, whichever storage library reads it."""
  try:
    return epath.Path(path).read_bytes()
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # tf.errors.NotFoundError for URLs
    if type(e).__name__ == "NotFoundError":
      raise FileNotFoundError(f"{path}: {str(e).strip().splitlines()[0]}") from None
    raise


def decode_image_rgb(path: str, exif_transpose: bool = False) -> np.ndarray:
  """[h, w, 3] uint8 RGB of the image file ``path`` (local or ``gs://``); see
  :func:`decode_image_bytes`. Raises FileNotFoundError when it is missing."""
  return decode_image_bytes(read_file_bytes(path), path, exif_transpose=exif_transpose)


def decode_image_bytes(data: bytes, path: str, exif_transpose: bool = False) -> np.ndarray:
  """[h, w, 3] uint8 RGB of any encoded image PIL reads (``path`` names it in errors); raises
  OSError/ValueError on bad data.

  16-bit grayscale (PIL modes ``I;16*``, and ``I`` with values in 0..65535; other ``I`` values
  are refused) maps 0..``full`` linearly onto 0..255, rounded, with ``full`` fixed by the file,
  never by the image's own range (a per-image stretch would change intensities between
  images): a PNG whose ``sBIT`` chunk gives ``b < 16`` significant bits holds ``b``-bit samples
  in its low bits, ``full = 2**b - 1`` (12-bit data in a 16-bit file), unless a sample needs
  more bits or all are multiples of ``2**(16 - b)``: that is the PNG spec's layout, samples
  shifted to the high bits, ``full = 65535``, as for every other 16-bit file. (16-bit colour
  PNGs come from PIL already reduced to their high bytes.)

  ``exif_transpose``: turn the pixels as the file's EXIF orientation says (as a photo viewer
  shows them). Off for data sets: COCO annotations refer to the stored pixels.
  """
  significant_bits = None
  with io.BytesIO(data) as f:
    try:
      img = Image.open(f)
    except UnidentifiedImageError:  # PIL's message would name the BytesIO object
      raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None
    img.load()
    if img.format == "PNG" and img.mode in _GRAY16_MODES:
      significant_bits = _png_significant_bits(f)
  if exif_transpose:
    img = ImageOps.exif_transpose(img)
  if img.mode == "RGB":
    return np.asarray(img)
  if img.mode == "F":  # float pixels have no fixed range: [0, 1] data would convert to black
    raise ValueError(f"{path}: a 32-bit float image (mode F); save it as 8-bit RGB")
  if img.mode in _GRAY16_MODES:
    a = np.asarray(img).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ValueError(f"{path}: a 32-bit integer image with values outside 0..65535 (mode I);"
                       " save it as 8- or 16-bit")
    full = _gray16_full_scale(a, significant_bits)
    a = (a * 255 + full // 2) // full
    return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
  return np.asarray(img.convert("RGB"))  # L, LA, P, RGBA, CMYK (incl. Adobe inverted), YCbCr


def checked_image(rec: ImageRecord, data: Optional[bytes] = None):
  """``(image [h, w, 3] uint8, None)``, or ``(None, (reason, message))`` when ``rec``'s image
  file (or its encoded bytes ``data``, when given) is missing, cannot be decoded or is not the
  size the JSON says (reasons ``missing_image``, ``corrupt_image``, ``image_size_mismatch``)."""
  try:
    image = decode_image_bytes(read_file_bytes(rec.path) if data is None else data, rec.path)
  except FileNotFoundError:
    return None, ("missing_image", f"image {rec.image_id}: file not found: {rec.path}")
  except Exception as e:  # PIL raises several types for corrupt data  # pylint: disable=broad-except
    return None, ("corrupt_image", f"image {rec.image_id}: cannot decode {rec.path}: "
                  f"{type(e).__name__}: {e}")
  if image.shape[:2] != (rec.height, rec.width):
    return None, ("image_size_mismatch", f"image {rec.image_id}: {rec.path} is {image.shape[0]}x"
                  f"{image.shape[1]} but the JSON says {rec.height}x{rec.width}; its masks would "
                  "not line up")
  return image, None


def example_from(rec: ImageRecord, image: np.ndarray, num_keypoints: int = 0):
  """``(example, None)`` for ``rec`` with its decoded ``image`` (see :meth:`CocoSource.load`),
  or ``(None, ('bad_segmentation', message))`` when pycocotools cannot decode its masks."""
  n = len(rec.classes)
  if n:
    try:
      rles = [segmentation_to_rle(s, rec.height, rec.width) for s in rec.segmentations]
      decoded = mask_utils.decode(rles)
    except (ValueError, TypeError) as e:  # construction checks should leave nothing to fail here
      return None, ("bad_segmentation", f"image {rec.image_id}: cannot decode its masks: "
                    f"{type(e).__name__}: {e}")
    # decode gives [h, w, N] in Fortran order; one transposing copy makes [N, h, w] C-order.
    masks = np.ascontiguousarray(np.transpose(decoded, (2, 0, 1)))
    xywh = np.asarray(rec.boxes_xywh, np.float32)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
  else:
    masks = np.zeros((0, rec.height, rec.width), np.uint8)
    boxes = np.zeros((0, 4), np.float32)
  ex = {"image": image, "boxes": boxes, "classes": np.asarray(rec.classes, np.int32),
        "masks": masks, "image_id": np.int32(rec.image_id), "ok": np.bool_(True)}
  if num_keypoints:
    ex["keypoints"] = (np.stack(rec.keypoints) if n
                       else np.zeros((0, num_keypoints, 3), np.float32))
  return ex, None


def placeholder_example(num_keypoints: int = 0) -> Dict[str, np.ndarray]:
  """The example a bad or padding slot carries: a 1x1 black image, no instances, ok=False
  (with ``keypoints`` [0, K, 3] when ``num_keypoints`` = K > 0)."""
  ex = {"image": np.zeros((1, 1, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
        "classes": np.zeros((0,), np.int32), "masks": np.zeros((0, 1, 1), np.uint8),
        "image_id": np.int32(-1), "ok": np.bool_(False)}
  if num_keypoints:
    ex["keypoints"] = np.zeros((0, num_keypoints, 3), np.float32)
  return ex


class CocoSource:
  """Random-access examples from a COCO instances JSON and its image folder.

  Attributes:
    records: the :class:`ImageRecord` s this source serves, in JSON order.
    categories: the :class:`CategoryMap`.
    num_keypoints: K (0: keypoints are not read).
    keypoint_names: the K names the categories list (() when K = 0).
    stats: the :class:`DataStats` counting skips (shared with the pipeline).
    dataset: the parsed JSON, as read (evaluation uses :meth:`ground_truth` instead).
    construction_problems: ``(reason, message)`` of each bad entry found at construction, in
      the order found (what the skip counts count; a training source's
      ``image_with_bad_annotation`` lines are not among them).
    images_with_bad_annotations: ids of the images with a refused annotation (training drops
      them).
    refused_annotations: reason -> how many of the JSON's annotations were left out at
      construction (``unknown_image_id``, ``unknown_category``, ``duplicate_image_id``,
      :func:`annotation_problem`'s reasons, and ``bad_keypoints``).
    dropped_images: reason -> how many ``images`` entries were left out at construction
      (``bad_image_entry``, ``duplicate_image_id``).
    load_failures: image id -> the reason its latest :meth:`load` failed (``missing_image``,
      ``corrupt_image``, ...); filled as images are loaded, on this process only.
  """

  def __init__(self, annotation_file: str, image_dir: str, *, training: bool,
               skip_empty: bool = True, on_bad_example: str = "skip",
               stats: Optional[DataStats] = None, num_keypoints: int = 0):
    if on_bad_example not in ("skip", "raise"):
      raise ValueError(f"on_bad_example must be 'skip' or 'raise', got {on_bad_example!r}")
    self.dataset = json.loads(_read_annotation_file(annotation_file))
    self.image_dir = image_dir
    self.training = training
    self.on_bad_example = on_bad_example
    self.stats = stats if stats is not None else DataStats()
    self.categories = CategoryMap(self.dataset.get("categories", []))
    self.num_keypoints = int(num_keypoints)
    self.keypoint_names: Tuple[str, ...] = (
        keypoint_names(self.dataset.get("categories", []), self.num_keypoints, annotation_file)
        if self.num_keypoints else ())
    self.refused_annotations: collections.Counter = collections.Counter()
    self.dropped_images: collections.Counter = collections.Counter()
    self.load_failures: Dict[int, str] = {}  # written from tf.data's threads; one dict op each
    self._accepted_annotations: List[Dict[str, Any]] = []
    self._image_entries: Dict[int, Dict[str, Any]] = {}  # image id -> its entry in the JSON
    self._problems: Optional[List[Tuple[str, str]]] = []
    self.images_with_bad_annotations: set = set()
    self.records = self._build_records(skip_empty)
    self.construction_problems: Tuple[Tuple[str, str], ...] = tuple(self._problems)
    self._problems = None  # load-time problems are counted in stats only

  def _bad(self, reason: str, message: str) -> None:
    if self._problems is not None:
      self._problems.append((reason, message))
    if self.on_bad_example == "raise":
      self.stats.last_error = message  # recorded as count() records a skip's message
      raise BadExampleError(message)
    self.stats.count(reason, message)

  def _build_records(self, skip_empty: bool) -> List[ImageRecord]:
    images, copies = {}, collections.Counter()
    for img in self.dataset.get("images", []):
      try:
        image_id = _as_int(img["id"])  # 1.5 or True is no id; int() would make them 1
        if image_id is None:
          raise ValueError(img["id"])
        images[image_id] = (str(img["file_name"]), int(img["height"]), int(img["width"]))
        copies[image_id] += 1
        self._image_entries[image_id] = img
      except (KeyError, TypeError, ValueError):
        self.dropped_images["bad_image_entry"] += 1
        self._bad("bad_image_entry", "image entry without an integer id or without file_name/"
                  f"height/width: {img!r}")
    # Which entry a repeated id's annotations belong to is unknowable (keeping one would pair
    # them with a maybe wrong file), so every entry with that id goes, with its annotations.
    duplicates = {i for i, n in copies.items() if n > 1}
    for image_id in sorted(duplicates):
      del images[image_id]
      self.dropped_images["duplicate_image_id"] += copies[image_id]
      self._bad("duplicate_image_id", f"image id {image_id} appears {copies[image_id]} times in "
                "the 'images' list; all its entries and annotations are dropped")
    anns_by_image = collections.defaultdict(list)
    bad_images = set()
    for ann in self.dataset.get("annotations", []):
      image_id, ann_id = ann.get("image_id"), ann.get("id")
      if image_id in duplicates:
        self.refused_annotations["duplicate_image_id"] += 1
        continue  # already counted (per image) as duplicate_image_id
      if image_id not in images:
        self.refused_annotations["unknown_image_id"] += 1
        self._bad("unknown_image_id", f"annotation {ann_id} refers to image id {image_id!r}, "
                  "which is not in the 'images' list")
        continue
      if ann.get("category_id") not in self.categories:
        self.refused_annotations["unknown_category"] += 1
        self._bad("unknown_category", f"annotation {ann_id} of image {image_id} has category id "
                  f"{ann.get('category_id')!r}, not in the categories {self.categories.category_ids}")
        bad_images.add(image_id)
        continue
      _, h, w = images[image_id]
      problem = annotation_problem(ann, h, w)
      if problem is not None:
        self.refused_annotations[problem[0]] += 1
        self._bad(problem[0], f"annotation {ann_id} of image {image_id}: {problem[1]}")
        bad_images.add(image_id)
        continue
      problem = keypoints_problem(ann, self.num_keypoints) if self.num_keypoints else None
      if problem is not None:
        self.refused_annotations["bad_keypoints"] += 1
        self._bad("bad_keypoints", f"annotation {ann_id} of image {image_id}: {problem}")
        bad_images.add(image_id)
        continue
      anns_by_image[image_id].append(ann)
      self._accepted_annotations.append(ann)
    self.images_with_bad_annotations = bad_images
    records = []
    for image_id, (file_name, h, w) in images.items():
      if self.training and image_id in bad_images:
        self.stats.count("image_with_bad_annotation", f"training skips image {image_id} "
                         "because one of its annotations is bad")
        continue
      anns = anns_by_image.get(image_id, [])
      usable = [a for a in anns if not a.get("iscrowd", 0)]
      if self.training and skip_empty and not usable:
        continue  # not an error: COCO has ~1% such images
      records.append(ImageRecord(
          image_id=image_id, path=join_path(self.image_dir, file_name), height=h, width=w,
          boxes_xywh=[[float(v) for v in a["bbox"]] for a in usable],
          classes=[int(c) for c in self.categories.to_contiguous([a["category_id"] for a in usable])],
          segmentations=[a["segmentation"] for a in usable], num_crowd=len(anns) - len(usable),
          keypoints=[parse_keypoints(a, self.num_keypoints) for a in usable]
          if self.num_keypoints else []))
    return records

  def __len__(self) -> int:
    return len(self.records)

  def image_entry(self, image_id: int) -> Dict[str, Any]:
    """The JSON's ``images`` entry of ``image_id`` (one of :attr:`records`)."""
    return self._image_entries[image_id]

  def ground_truth(self) -> Dict[str, Any]:
    """The JSON as this source accepted it, for pycocotools (``COCO().dataset``).

    ``images``: the entries of :attr:`records`; ``annotations``: their annotations that passed
    the checks, crowd ones included (COCOeval reads them as "ignore" regions); other top-level
    keys (``categories``, ``info``, ...) as in the file. The dicts are the parsed JSON's own,
    not copies.
    """
    served = {r.image_id for r in self.records}
    images = [self._image_entries[r.image_id] for r in self.records]
    annotations = [a for a in self._accepted_annotations if a.get("image_id") in served]
    return dict(self.dataset, images=images, annotations=annotations)

  def load(self, index: int) -> Dict[str, np.ndarray]:
    """Example ``index`` (``-1``: a padding slot) as numpy arrays in original pixels.

    Returns:
      ``image``: [h, w, 3] uint8 RGB; ``boxes``: [N, 4] float32 xyxy pixels; ``classes``: [N]
      int32 in 1..K; ``masks``: [N, h, w] uint8 {0, 1}; ``image_id``: int32; ``ok``: bool,
      False for a padding slot or a skipped bad example (then it is :func:`placeholder_example`);
      with keypoints on, ``keypoints``: [N, K, 3] float32 (x, y, v) original pixels.
    """
    index = int(index)
    if index < 0:
      return placeholder_example(self.num_keypoints)
    rec = self.records[index]
    image, problem = checked_image(rec)
    if problem is None:
      ex, problem = example_from(rec, image, self.num_keypoints)
    if problem is not None:
      return self._bad_load(rec, *problem)
    return ex

  def _bad_load(self, rec: ImageRecord, reason: str, message: str) -> Dict[str, np.ndarray]:
    self.load_failures[rec.image_id] = reason
    self._bad(reason, message)
    return placeholder_example(self.num_keypoints)
