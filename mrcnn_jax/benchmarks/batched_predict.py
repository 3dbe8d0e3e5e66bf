"""Per-image time of ``Predictor`` one by one against ``predict_batch``, with and without the
host post-processing (mask paste, RLE) overlapped with the next batch's network work.

Three ways through the same mixed-size images, each to COCO result records (what
``predict_files`` and evaluation need), timed in alternating rounds (``timing.median_times``):

* ``one_by_one``:  ``Predictor.predict`` per image (the batch-1 program), then its RLE;
* ``batched``:     ``predict_iter(overlap=False)``: each batch fetched and pasted before the next
                   is dispatched;
* ``overlapped``:  ``predict_iter(overlap=True)``: batch k + 1 dispatched before batch k is
                   pasted and RLE-encoded, so the host works while the device does.

Random weights: the detection score threshold is 0 and ``detections`` instances are kept per
image, so the host work is that of a trained model finding that many objects.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from mrcnn_jax import config as config_lib
from mrcnn_jax import inference
from mrcnn_jax import modeling
from mrcnn_jax.benchmarks import timing
from mrcnn_jax.modeling.config import tiny_model_config

MODES = ("one_by_one", "batched", "overlapped")


@dataclasses.dataclass
class Result:
  """Medians over ``rounds`` of each mode's pass over all images."""
  model: str
  image_size: Tuple[int, int]
  batch_size: int
  num_images: int
  detections: int
  rounds: int
  wall_s: Dict[str, float]           # whole pass, median
  cpu_s: Dict[str, float]            # this process's CPU seconds of a pass, median
  walls: Dict[str, List[float]]      # every round's wall seconds
  load_average: Tuple[Tuple[float, float, float], Tuple[float, float, float]]  # before, after

  def per_image_ms(self, mode: str) -> float:
    return 1e3 * self.wall_s[mode] / self.num_images

  def ratio(self, mode: str, baseline: str = "one_by_one") -> float:
    """Per-image time of ``mode`` over ``baseline`` (< 1: faster)."""
    return self.wall_s[mode] / self.wall_s[baseline]

  def summary(self) -> str:
    lines = [f"{self.num_images} images, {self.model} at {self.image_size[0]}x"
             f"{self.image_size[1]}, batch {self.batch_size}, {self.detections} detections per "
             f"image, median of {self.rounds} alternating rounds, {jax.devices()[0].device_kind}"
             f", load average {self.load_average[0]} before, {self.load_average[1]} after"]
    for mode in MODES:
      lines.append(f"  {mode:11s} {self.per_image_ms(mode):8.1f} ms/image  "
                   f"(cpu {1e3 * self.cpu_s[mode] / self.num_images:7.1f} ms/image)  "
                   f"x{self.ratio(mode):.3f} of one_by_one")
    lines.append(f"  overlapped / batched: x{self.ratio('overlapped', 'batched'):.3f}")
    return "\n".join(lines)


def mixed_size_images(num_images: int, min_side: int = 300, max_side: int = 900,
                      seed: int = 0) -> List[np.ndarray]:
  """``num_images`` random [h, w, 3] uint8 images, h and w uniform in [min_side, max_side]."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
          for h, w in rng.integers(min_side, max_side + 1, (num_images, 2))]


def benchmark_config(model: str, image_size: Tuple[int, int],
                     detections: int) -> ml_collections.ConfigDict:
  """The default config ('r50': R50-FPN, 91 classes) or the tests' tiny model ('tiny'), at
  ``image_size``, keeping ``detections`` instances per image whatever their score."""
  config = config_lib.get_base_config()
  config.data.image_size = tuple(image_size)
  if model == "tiny":
    config.model = tiny_model_config(num_classes=3)
  elif model != "r50":
    raise ValueError(f"model must be 'r50' or 'tiny', got {model!r}")
  config.model.detections_per_image = detections
  config.model.roi.score_threshold = 0.0  # random weights: every class scores about 1/K
  return config


def make_predictor(config: ml_collections.ConfigDict, batch_size: int) -> inference.Predictor:
  variables = modeling.init_variables(modeling.MaskRCNN(config.model), jax.random.PRNGKey(0),
                                      tuple(config.data.image_size))
  return inference.Predictor(config, variables, score_threshold=0.0, batch_size=batch_size)


def passes(predictor: inference.Predictor,
           images: Sequence[np.ndarray]) -> Dict[str, Callable[[], int]]:
  """One function per mode: predicts every image, makes its COCO records, returns their count."""

  def records(results):
    return sum(len(inference.to_coco_results(r, i)) for i, r in enumerate(results))

  return {
      "one_by_one": lambda: records(predictor.predict(image) for image in images),
      "batched": lambda: records(predictor.predict_iter(images, overlap=False)),
      "overlapped": lambda: records(predictor.predict_iter(images, overlap=True)),
  }


def run(model: str = "tiny", image_size: Tuple[int, int] = (512, 512), batch_size: int = 8,
        num_images: int = 32, detections: int = 20, rounds: int = 5,
        min_side: int = 300, max_side: int = 900) -> Result:
  """Times the three modes on ``num_images`` mixed-size images (see the module docstring)."""
  if rounds < 1 or num_images < 1:
    raise ValueError(f"rounds and num_images must be >= 1, got {rounds}, {num_images}")
  predictor = make_predictor(benchmark_config(model, image_size, detections), batch_size)
  images = mixed_size_images(num_images, min_side, max_side)
  fns = passes(predictor, images)
  counts = {m: set() for m in MODES}

  def counted(mode):
    return lambda: counts[mode].add(fns[mode]())

  before = os.getloadavg()
  # The first (untimed) call of each mode compiles its program.
  medians, walls = timing.median_times([counted(m) for m in MODES], rounds)
  if len(set.union(*counts.values())) != 1:
    raise RuntimeError(f"the modes disagree on the number of instances: {counts}")
  return Result(model=model, image_size=tuple(image_size), batch_size=batch_size,
                num_images=num_images, detections=detections, rounds=rounds,
                wall_s={m: w for m, (w, _) in zip(MODES, medians)},
                cpu_s={m: c for m, (_, c) in zip(MODES, medians)},
                walls=dict(zip(MODES, walls)),
                load_average=(tuple(round(v, 2) for v in before),
                              tuple(round(v, 2) for v in os.getloadavg())))
