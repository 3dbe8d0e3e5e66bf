r"""Per-image time of batched prediction (host post-processing overlapped) against one by one.

See ``mrcnn_jax.benchmarks.batched_predict`` for what is measured and how; docs/benchmarks.md
for the figures.

Usage::

  python scripts/benchmark_batched_predict.py                  # tiny model, 512x512, batch 8
  python scripts/benchmark_batched_predict.py --model r50 --rounds 5 --json out.json
"""

from __future__ import annotations

import dataclasses
import json

from absl import app
from absl import flags

from mrcnn_jax.benchmarks import batched_predict
import _cli  # scripts/_cli.py

_MODEL = flags.DEFINE_enum("model", "tiny", ["tiny", "r50"], "tests' tiny model or R50-FPN")
_SIZE = flags.DEFINE_list("image_size", ["512", "512"], "static network input H,W")
_BATCH = flags.DEFINE_integer("batch_size", 8, "static batch of predict_batch", lower_bound=1)
_NUM = flags.DEFINE_integer("num_images", 32, "mixed-size images per pass", lower_bound=1)
_SIDES = flags.DEFINE_list("sides", ["300", "900"], "min,max side of the random images")
_DETECTIONS = flags.DEFINE_integer("detections", 20, "instances kept (pasted) per image",
                                   lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "alternating timed rounds (median reported)",
                               lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "also write the result here")


def _run(argv):
  del argv
  size, sides = [int(v) for v in _SIZE.value], [int(v) for v in _SIDES.value]
  if len(size) != 2 or len(sides) != 2:
    raise ValueError("--image_size and --sides take two integers each")
  result = batched_predict.run(_MODEL.value, tuple(size), _BATCH.value, _NUM.value,
                               _DETECTIONS.value, _ROUNDS.value, *sides)
  print(result.summary())
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dataclasses.asdict(result), f, indent=1)


def main(argv):
  _cli.run_main(_run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
