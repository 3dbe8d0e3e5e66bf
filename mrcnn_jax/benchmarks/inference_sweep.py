"""Inference sweep: ``predict`` over batch sizes x input shapes x dtypes on the present backend.

Per point (R50-FPN at torchvision's defaults, random weights, every detection slot computed
as ``recipe.recipe_config`` sets it):

* compile: ``jit(...).lower(...).compile()`` timed apart, cold (empty persistent compilation
  cache) and warm (the same program again, served from JAX's persistent cache in ``cache_dir``);
* latency p50 / p90 / p99 of single calls on device-resident inputs (each call blocked on);
* throughput: ``repeats`` calls back to back, one block at the end (images/s);
* FLOPs (XLA's count of the plain program lowered for the CPU, ``recipe.predict_flops``),
  bytes accessed (XLA's cost analysis of the compiled program), memory (``memory_analysis``)
  and MFU against the peak table shared with the training benchmark (``recipe.peak_flops``;
  on a CPU the FLOPs are the direct convolutions' while the CPU kernels compute Winograd
  convolutions against a measured matmul peak, so the CPU's MFU can pass 100%);
* optionally the StableHLO and optimised HLO text of each program.

:func:`compare_exported` times an exported artifact (``inference.exported``) against the
in-process ``predict`` at its batch and shape, alternating, for the "runs as fast" check.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from mrcnn_jax.benchmarks import programs
from mrcnn_jax.benchmarks import recipe
from mrcnn_jax.benchmarks import timing

Log = Callable[[str], None]


@dataclasses.dataclass
class SweepOptions:
  """The grid and how each point is timed."""
  batch_sizes: Sequence[int] = (1, 2, 4, 8)
  shapes: Sequence[Tuple[int, int]] = ((832, 1344),)
  dtypes: Sequence[str] = ("float32", "bfloat16")
  repeats: int = 20  # latency samples, and calls in the throughput run
  warmup: int = 2
  every_slot: bool = True  # see recipe.recipe_config
  hlo_dir: Optional[str] = None  # write each program's StableHLO and HLO here
  cache_dir: Optional[str] = None  # persistent compilation cache (default: a temp folder)
  # (shape, dtype, batch) -> config; default the R50-FPN of recipe.recipe_config
  make_config: Optional[Callable[[Tuple[int, int], str, int], Any]] = None


def _config(shape: Tuple[int, int], dtype: str, batch: int, every_slot: bool):
  options = recipe.Options(height=shape[0], width=shape[1], compute_dtype=dtype,
                           every_slot=every_slot)
  return recipe.recipe_config(options, batch)


def _percentiles(seconds: Sequence[float]) -> Dict[str, float]:
  ms = 1e3 * np.asarray(seconds)
  return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def _compile_twice(predict, args) -> Tuple[Any, Any, float, float]:
  """(lowered, compiled, cold s, warm s): the second compile is served by the persistent
  cache the first one filled."""
  t0 = time.perf_counter()
  lowered = predict.lower(*args)
  compiled = lowered.compile()
  cold = time.perf_counter() - t0
  jax.clear_caches()  # the warm compile must come from the persistent cache, not memory
  t0 = time.perf_counter()
  compiled = predict.lower(*args).compile()
  warm = time.perf_counter() - t0
  return lowered, compiled, cold, warm


def measure_point(shape: Tuple[int, int], dtype: str, batch: int, options: SweepOptions,
                  peak: float, log: Log = print) -> Dict[str, Any]:
  """One (shape, dtype, batch) point of the sweep (see the module docstring)."""
  h, w = shape
  if options.make_config is not None:
    config = options.make_config(shape, dtype, batch)
  else:
    config = _config(shape, dtype, batch, options.every_slot)
  predict, args = programs.random_predict(config, batch)
  lowered, compiled, cold, warm = _compile_twice(predict, args)
  if options.hlo_dir:
    os.makedirs(options.hlo_dir, exist_ok=True)
    stem = os.path.join(options.hlo_dir, f"predict_{h}x{w}_{dtype}_b{batch}")
    with open(stem + ".stablehlo.mlir", "w") as f:
      f.write(lowered.as_text())
    with open(stem + ".hlo.txt", "w") as f:
      f.write(compiled.as_text())

  def call():
    return compiled(*args)

  for _ in range(options.warmup):
    jax.block_until_ready(call())
  latencies = []
  for _ in range(options.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    latencies.append(time.perf_counter() - t0)
  throughput = batch * options.repeats / timing.back_to_back_seconds(call, options.repeats)
  flops = recipe.predict_flops(config, batch)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  p50 = float(np.median(latencies))
  point = {"height": h, "width": w, "dtype": dtype, "batch": batch,
           "compile_cold_s": cold, "compile_warm_s": warm, **_percentiles(latencies),
           "images_per_s": throughput, "flops": flops,
           "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
           "memory_bytes": recipe.memory(compiled).get("total"),
           "mfu": flops / p50 / peak}
  log(f"predict {h}x{w} {dtype} batch {batch}: p50 {point['p50_ms']:.1f} ms, p90 "
      f"{point['p90_ms']:.1f} ms, {throughput:.1f} img/s, MFU {100 * point['mfu']:.1f}%, "
      f"compile {cold:.1f} s cold / {warm:.1f} s warm")
  return point


def _reset_persistent_cache() -> None:
  from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.reset_cache()


def sweep(options: SweepOptions, log: Log = print) -> Dict[str, Any]:
  """Every point of the grid, with the device and its peak."""
  device = jax.devices()[0]
  peak, source = recipe.peak_flops(device, log)
  cache_dir = options.cache_dir or tempfile.mkdtemp(prefix="mrcnn_jax_cache_")
  previous = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _reset_persistent_cache()  # JAX reads the cache settings once, at its first compile
  try:
    points = [measure_point(tuple(shape), dtype, int(batch), options, peak, log)
              for shape in options.shapes for dtype in options.dtypes
              for batch in options.batch_sizes]
  finally:
    for k, v in previous.items():
      jax.config.update(k, v)
    _reset_persistent_cache()
    if not options.cache_dir:
      shutil.rmtree(cache_dir, ignore_errors=True)
  return {"device_kind": device.device_kind, "platform": device.platform,
          "jax": jax.__version__, "peak_flops": peak, "peak_flops_source": source,
          "options": {k: v for k, v in dataclasses.asdict(options).items()
                      if k != "make_config"}, "points": points}


def compare_exported(directory: str, rounds: int = 5, repeats: int = 5,
                     log: Log = print) -> Dict[str, Any]:
  """Median per-call seconds of the artifact in ``directory`` and of the in-process
  ``predict`` (as ``inference.Predictor`` compiles it) at the artifact's batch and shape,
  taking turns over ``rounds`` rounds of ``repeats`` calls each."""
  from mrcnn_jax.inference import exported as exported_lib  # pylint: disable=import-outside-toplevel
  from mrcnn_jax.modeling.config import upgrade_model_config  # pylint: disable=import-outside-toplevel
  artifact = exported_lib.load(directory)
  sidecar = artifact.sidecar
  batch, (h, w) = artifact.batch_size, artifact.image_size
  config = _config((h, w), sidecar["compute_dtype"], batch, False)
  config.model = upgrade_model_config(sidecar["model"])
  predict, args = programs.random_predict(config, batch)
  _, images, valid_size = args
  fns = [lambda: timing.back_to_back_seconds(lambda: predict(*args), repeats),
         lambda: timing.back_to_back_seconds(lambda: artifact(images, valid_size), repeats)]
  medians, walls = timing.median_times(fns, rounds)
  inproc, exported = (m[0] / repeats for m in medians)
  ratios = [e / i for i, e in zip(walls[0], walls[1])]
  log(f"exported / in-process predict at batch {batch}, {h}x{w}: {1e3 * exported:.1f} / "
      f"{1e3 * inproc:.1f} ms per call = {exported / inproc:.3f} (per round "
      f"{min(ratios):.3f}-{max(ratios):.3f})")
  return {"batch": batch, "height": h, "width": w, "in_process_s": inproc,
          "exported_s": exported, "ratio": exported / inproc,
          "paired_ratio_median": float(np.median(ratios)), "rounds": rounds}


def write(results: Dict[str, Any], out_dir: str) -> List[str]:
  """``sweep.json``, ``sweep.csv`` and ``sweep.png`` (img/s and p90 latency against batch
  size, one line per shape and dtype) in ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"sweep.{ext}") for ext in ("json", "csv", "png")]
  with open(paths[0], "w") as f:
    json.dump(results, f, indent=1)
  points = results["points"]
  with open(paths[1], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(points[0]))
    writer.writeheader()
    writer.writerows(points)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
  for key in sorted({(p["height"], p["width"], p["dtype"]) for p in points}):
    line = sorted((p for p in points if (p["height"], p["width"], p["dtype"]) == key),
                  key=lambda p: p["batch"])
    label = f"{key[0]}x{key[1]} {key[2]}"
    ax_rate.plot([p["batch"] for p in line], [p["images_per_s"] for p in line], "o-",
                 label=label)
    ax_lat.plot([p["batch"] for p in line], [p["p90_ms"] for p in line], "o-", label=label)
  for ax, ylabel in ((ax_rate, "images/s"), (ax_lat, "p90 latency (ms)")):
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
  ax_rate.legend()
  fig.suptitle(f"predict on {results['device_kind']} (jax {results['jax']})")
  fig.tight_layout()
  fig.savefig(paths[2], dpi=100)
  plt.close(fig)
  return paths
