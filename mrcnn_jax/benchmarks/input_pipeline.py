"""Images/s of the training input pipeline at a given network input size.

Generates a synthetic shapes set (images 640x640 / 640x480 / 480x640, like COCO's) unless the
folder already holds one, then times the training stream (decode, flip, scale jitter, resize,
pad, mask targets, batching) after a warm-up.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence, Tuple

from mrcnn_jax import data
from mrcnn_jax.config import get_base_config


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What :func:`measure` timed."""
  images: int  # timed images (steps x batch)
  wall_s: float
  cpu_s: float  # this process's CPU seconds: robust to other processes sharing the cores
  image_shape: tuple  # (height, width) of a batch's images
  batch_size: int
  mask_size: int
  max_instances: int
  load_average: float  # 1-minute load average when the timing ended

  def describe(self) -> str:
    """One line: images/s wall (what a trainer sees) and per CPU-second, and the setting."""
    return (f"input pipeline: {self.images / self.wall_s:.1f} images/s wall, "
            f"{self.images / self.cpu_s:.1f} images per CPU-second "
            f"(load average {self.load_average:.1f}; {self.images} images of "
            f"{self.image_shape[0]}x{self.image_shape[1]}, batch {self.batch_size}, "
            f"{os.cpu_count()} CPUs, mask {self.mask_size}, max_instances "
            f"{self.max_instances})")


def ensure_shapes_set(data_dir: str, num_images: int, size: int,
                      log: Callable[[str], None] = print) -> None:
  """Generates ``num_images`` training images of ``size`` px in ``data_dir`` unless it holds a
  shapes set already."""
  if os.path.exists(data.shapes_data_paths(data_dir)["train_annotations"]):
    return
  t0 = time.time()
  data.generate_shapes(data_dir, num_train=num_images, num_val=1, size=size, seed=0)
  log(f"generated {num_images} images of {size} px in {time.time() - t0:.1f} s")


def measure(data_dir: str, batch_size: int, steps: int, warmup: int, image_size: int,
            min_size: int = 0, max_size: int = 0,
            buckets: Sequence[Tuple[int, int]] = ()) -> Throughput:
  """Times ``steps`` batches of the training stream over the shapes set in ``data_dir``, at a
  padded ``image_size`` x ``image_size`` input (or the aspect ``buckets``; images scaled by
  ``min_size`` / ``max_size`` as ``config.data`` says), after ``warmup`` untimed batches."""
  config = get_base_config()
  config.data.update(data.shapes_data_paths(data_dir))
  config.data.image_size = (image_size, image_size)
  config.data.min_size, config.data.max_size = int(min_size), int(max_size)
  config.data.buckets = tuple(tuple(b) for b in buckets)
  config.train.batch_size = batch_size
  pipeline = data.build_train_dataset(config, process_index=0, process_count=1)
  it = iter(pipeline)
  for _ in range(warmup):
    next(it)
  t0, c0 = time.time(), time.process_time()
  for _ in range(steps):
    batch = next(it)
  wall, cpu = time.time() - t0, time.process_time() - c0
  return Throughput(steps * batch_size, wall, cpu, tuple(batch["image"].shape[1:3]), batch_size,
                    config.data.mask_size, config.data.max_instances, os.getloadavg()[0])
