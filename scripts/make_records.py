"""Converts a COCO-format set (instances JSON + image folder, local or gs://) into sharded
TFRecord files and an index for pod input (:mod:`mrcnn_jax.data.records`).

  python scripts/make_records.py --annotations gs://b/coco/annotations/instances_train2017.json \
      --images gs://b/coco/train2017 --output gs://b/coco/records/train --num_shards 256

Writes ``OUTPUT-00000-of-00256.tfrecord`` ..., ``OUTPUT.index.json`` and
``OUTPUT.ground_truth.json``; train from them with
``--config.data.train_records=OUTPUT.index.json`` (``eval_records`` likewise). Prints the
files, the images per second, and every entry the JSON source would skip (counted by reason).
"""

from __future__ import annotations

import _cli  # noqa: F401
from absl import app
from absl import flags

_ANNOTATIONS = flags.DEFINE_string("annotations", None, "COCO instances JSON (local or gs://)")
_IMAGES = flags.DEFINE_string("images", None, "folder holding the JSON's file_name entries")
_OUTPUT = flags.DEFINE_string("output", None, "output prefix, e.g. gs://b/records/train")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 64, "number of record files (a few per host; "
                                   "at most one per image)")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 8, "threads reading and checking images")
_SHOW = flags.DEFINE_integer("show", 20, "bad entries printed (all are in the index)")
flags.mark_flags_as_required(["annotations", "images", "output"])


def _convert() -> None:
  from mrcnn_jax.data import records  # pylint: disable=g-import-not-at-top
  report = records.write_records(_ANNOTATIONS.value, _IMAGES.value, _OUTPUT.value,
                                 _NUM_SHARDS.value, num_workers=_NUM_WORKERS.value)
  for reason, message in report.problems[:_SHOW.value]:
    print(f"skip ({reason}): {message}")
  if len(report.problems) > _SHOW.value:
    print(f"... {len(report.problems) - _SHOW.value} more bad entries listed in {report.index}")
  print(f"{report.num_images} images -> {report.num_records} records in {len(report.shards)} "
        f"shards, {report.bytes_written / 1e6:.1f} MB, {report.seconds:.1f} s "
        f"({report.num_images / max(report.seconds, 1e-9):.0f} images/s)")
  print(f"skips: {report.counts or 'none'}")
  print(f"shards: {report.shards[0]} ... {report.shards[-1]}")
  print(f"index: {report.index} (config.data.train_records / eval_records)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _cli.run_main(lambda _: _convert(), argv)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main, flags_parser=_cli.parse_flags)
