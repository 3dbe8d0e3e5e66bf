"""Images/s of the training input pipeline at 1024x1024 (COCO-like 640-px JPEG/PNG sources).

  python scripts/benchmark_input.py --num_images 64 --batch_size 8 --steps 20

Generates a synthetic shapes set (images 640x640 / 640x480 / 480x640, like COCO's) in a temp
folder unless --data_dir holds one, then times the training stream (decode, flip, scale jitter,
resize, pad, mask targets at 112x112, batching) after a warm-up.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags

from mrcnn_jax import data
from mrcnn_jax.config import get_base_config

_DATA_DIR = flags.DEFINE_string("data_dir", None, "shapes set to reuse (default: a temp dir)")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "training images to generate")
_SIZE = flags.DEFINE_integer("size", 640, "longer side of the generated images")
_BATCH = flags.DEFINE_integer("batch_size", 8, "host batch size")
_STEPS = flags.DEFINE_integer("steps", 20, "timed batches")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed batches")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 1024, "padded network input side")


def main(argv):
  del argv
  out = _DATA_DIR.value or tempfile.mkdtemp(prefix="shapes_bench_")
  if not os.path.exists(data.shapes_data_paths(out)["train_annotations"]):
    t0 = time.time()
    data.generate_shapes(out, num_train=_NUM_IMAGES.value, num_val=1, size=_SIZE.value, seed=0)
    print(f"generated {_NUM_IMAGES.value} images of {_SIZE.value} px in {time.time() - t0:.1f} s")
  config = get_base_config()
  config.data.update(data.shapes_data_paths(out))
  config.data.image_size = (_IMAGE_SIZE.value, _IMAGE_SIZE.value)
  config.train.batch_size = _BATCH.value
  pipeline = data.build_train_dataset(config, process_index=0, process_count=1)
  it = iter(pipeline)
  for _ in range(_WARMUP.value):
    next(it)
  t0, c0 = time.time(), time.process_time()
  for _ in range(_STEPS.value):
    batch = next(it)
  dt, cpu = time.time() - t0, time.process_time() - c0
  n = _STEPS.value * _BATCH.value
  # CPU seconds per image are robust to other processes sharing the cores; wall-clock images/s
  # is what a trainer sees.
  print(f"input pipeline: {n / dt:.1f} images/s wall, {n / cpu:.1f} images per CPU-second "
        f"(load average {os.getloadavg()[0]:.1f}; {n} images of "
        f"{batch['image'].shape[1]}x{batch['image'].shape[2]}, batch {_BATCH.value}, "
        f"{os.cpu_count()} CPUs, mask {config.data.mask_size}, max_instances "
        f"{config.data.max_instances})")


if __name__ == "__main__":
  app.run(main)
