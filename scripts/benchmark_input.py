"""Images/s of the training input pipeline at 1024x1024 (COCO-like 640-px JPEG/PNG sources).

  python scripts/benchmark_input.py --num_images 64 --batch_size 8 --steps 20
  python scripts/benchmark_input.py --recipe     # 800/1333 resize into 832x1344 / 1344x832

Generates a synthetic shapes set in a temp folder unless --data_dir holds one, then times the
training stream after a warm-up (``mrcnn_jax.benchmarks.input_pipeline``).
"""

from __future__ import annotations

import tempfile

from absl import app
from absl import flags

from mrcnn_jax.benchmarks import input_pipeline

_DATA_DIR = flags.DEFINE_string("data_dir", None, "shapes set to reuse (default: a temp dir)")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "training images to generate")
_SIZE = flags.DEFINE_integer("size", 640, "longer side of the generated images")
_BATCH = flags.DEFINE_integer("batch_size", 8, "host batch size")
_STEPS = flags.DEFINE_integer("steps", 20, "timed batches")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed batches")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 1024, "padded network input side")
_MIN_SIZE = flags.DEFINE_integer("min_size", 0, "config.data.min_size (0: fit into the input)")
_MAX_SIZE = flags.DEFINE_integer("max_size", 0, "config.data.max_size")
_RECIPE = flags.DEFINE_bool("recipe", False, "the 1x/3x recipes' input: shorter side 800, "
                            "longer <= 1333, buckets 832x1344 / 1344x832")


def main(argv):
  del argv
  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="shapes_bench_")
  input_pipeline.ensure_shapes_set(data_dir, _NUM_IMAGES.value, _SIZE.value)
  if _RECIPE.value:
    sizes = dict(image_size=1344, min_size=800, max_size=1333,
                 buckets=((832, 1344), (1344, 832)))
  else:
    sizes = dict(image_size=_IMAGE_SIZE.value, min_size=_MIN_SIZE.value,
                 max_size=_MAX_SIZE.value)
  result = input_pipeline.measure(data_dir, _BATCH.value, _STEPS.value, _WARMUP.value, **sizes)
  print(result.describe())


if __name__ == "__main__":
  app.run(main)
