"""Recipe-scale speed: the train step and ``predict`` at a COCO recipe's input shape.

On whatever backend is present (all local devices for training, one for inference), with the
programs built as the trainer and ``inference.Predictor`` build them (``programs``). Per
program it reports:

* compile seconds (``lower`` + ``compile``, ahead of time, as the trainer does at start);
* step time and images/s per device: ``steps`` calls dispatched back to back on device-resident
  inputs, one ``block_until_ready`` at the end (no host sync in between, as in the train loop);
* the convolutions and dots of the compiled program by dtype (``hlo_audit``);
* memory: XLA's ``memory_analysis`` of the compiled program (arguments + outputs - donated
  aliases + temporaries) and, where the runtime reports it, the allocator's peak so far;
* FLOPs per step from XLA's cost analysis of the program lowered for the CPU with the plain
  kernels (the model's convolutions as written, not the CPU's Winograd form; GPU backends
  count no cuDNN convolution), and model FLOPs utilisation
  (MFU) against :data:`PEAK_FLOPS` for the device kind, or, on a CPU, a float32 matmul's rate
  measured here (no bfloat16 units: bfloat16 on a CPU is expected to be slower, not tuned).

Inputs are synthetic (``synthetic.train_batch``: random pixels, ``num_objects`` boxes per
image); the input pipeline's own rate is ``input_pipeline``'s measurement.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax import modeling
from mrcnn_jax.benchmarks import hlo_audit
from mrcnn_jax.benchmarks import programs
from mrcnn_jax.benchmarks import scaling
from mrcnn_jax.benchmarks import synthetic
from mrcnn_jax.benchmarks import timing

Log = Callable[[str], None]

# Dense bfloat16 tensor FLOP/s per chip, from the vendors' data sheets (no sparsity). The first
# entry whose text is in ``device.device_kind`` applies.
PEAK_FLOPS: Tuple[Tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),       # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),       # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
)


@dataclasses.dataclass
class Options:
  """One train and one inference measurement (see the module docstring)."""
  height: int = 832
  width: int = 1344
  train_batch: int = 8  # per device
  infer_batch: int = 8  # on one device
  compute_dtype: str = "bfloat16"
  remat: str = "none"  # config.model.backbone.remat
  steps: int = 20
  warmup: int = 3
  num_objects: int = 7  # boxes per synthetic image (COCO averages about 7 instances)
  every_slot: bool = True  # compute every mask / detection slot (see recipe_config)
  train: bool = True
  infer: bool = True


def recipe_config(options: Options, batch: int) -> ml_collections.ConfigDict:
  """The R50-FPN config (torchvision's defaults, 91 classes) at the options' shape and dtype."""
  config = synthetic.model_config(options.height, options.width, batch, options.compute_dtype)
  config.model.backbone.remat = options.remat
  if options.every_slot:
    # The steady state of a COCO run: the 128 mask slots filled with positives in training, the
    # 100 detections per image filled at inference. Random weights would leave both mostly
    # empty (and their mask chunks skipped); this also makes XLA's FLOP count what runs.
    config.model.mask.chunk_size = 0
    config.model.roi.score_threshold = 0.0
  return config


def peak_flops(device: jax.Device, log: Log = print) -> Tuple[float, str]:
  """(FLOP/s, where it came from) of one ``device``: the table, or a CPU measurement."""
  kind = device.device_kind
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops, f"data sheet, dense bf16 ({name})"
  if device.platform == "cpu":
    flops = measured_matmul_flops(device)
    log(f"CPU peak: {flops / 1e9:.1f} GFLOP/s (float32 matmul, measured)")
    return flops, "measured: float32 2048x2048 matmul"
  return float("nan"), f"unknown device kind {kind!r}"


def measured_matmul_flops(device: jax.Device, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a float32 ``n``x``n`` matmul on ``device`` (best of ``repeats``)."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def memory(compiled: Any) -> Dict[str, int]:
  """XLA's memory analysis of a compiled program, in bytes; ``total`` = what it holds at once."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def flops(lowered: Any) -> float:
  """XLA's FLOP count of a program lowered for the CPU (a ``cond`` counts as its costlier
  branch). GPU backends analyse neither lowered programs nor cuDNN convolutions."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def _on_cpu(tree: Any) -> Any:
  """Abstract arrays of ``tree`` placed on the host CPU (so the program lowers for it)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), tree)


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one train step on ``config.train.batch_size`` images, plain kernels."""
  mesh = programs.make_mesh(jax.devices("cpu")[:1])
  model = programs.build_model(config, mesh, modeling.PLAIN)
  state = jax.eval_shape(lambda: programs.train_state(config, model, mesh))
  h, w = config.data.image_size
  step = programs.train_step(config, model, mesh, state)
  return flops(step.lower(state, scaling.abstract_batch(config, config.train.batch_size, h, w,
                                                        mesh)))


def predict_flops(config: ml_collections.ConfigDict, batch: int) -> float:
  """FLOPs of one ``predict`` call on ``batch`` images, plain kernels."""
  h, w = config.data.image_size
  model = programs.build_model(config, kernel_set=modeling.PLAIN)
  variables = _on_cpu(jax.eval_shape(lambda: programs.random_variables(model, (h, w))))
  images = _on_cpu(jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8))
  valid_size = _on_cpu(jax.ShapeDtypeStruct((batch, 2), jnp.int32))
  return flops(programs.predict_function(model, library=False).lower(variables, images,
                                                                       valid_size))


def allocator_peak(device: jax.Device) -> Optional[int]:
  """The runtime allocator's peak bytes on ``device`` so far in this process (it is never
  reset: only the first program measured reads its own peak); None where the runtime reports
  none (CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _as_json(counts) -> Dict[str, int]:
  return {f"{op} {dtype}": n for (op, dtype), n in sorted(counts.items())}


def _rates(seconds: float, steps: int, images_per_step: int, num_devices: int,
           step_flops: float, peak: float) -> Dict[str, float]:
  step_s = seconds / steps
  return {"step_ms": 1e3 * step_s,
          "images_per_s_per_device": images_per_step / step_s / num_devices,
          "mfu": step_flops / step_s / (peak * num_devices)}


def measure_train(config: ml_collections.ConfigDict, options: Options, peak: float,
                  log: Log = print) -> Dict[str, Any]:
  """The trainer's step over all local devices at ``config.train.batch_size`` (global)."""
  h, w = config.data.image_size
  batch = int(config.train.batch_size)
  mesh = programs.make_mesh()
  model = programs.build_model(config, mesh)
  state = programs.train_state(config, model, mesh)
  step = programs.train_step(config, model, mesh, state)
  abstract = scaling.abstract_batch(config, batch, h, w, mesh)
  t0 = time.perf_counter()
  lowered = step.lower(state, abstract)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  log(f"train step compiled in {compile_s:.1f} s")
  step_flops = train_step_flops(config)
  hlo = hlo_audit.op_dtypes(compiled.as_text())

  rng = np.random.default_rng(0)
  host = synthetic.train_batch(rng, batch, h, w, int(config.data.max_instances),
                               int(config.data.mask_size), options.num_objects)
  device_batch = programs.shard_batch(host, mesh)
  holder = [state]

  def call():
    holder[0], metrics = compiled(holder[0], device_batch)  # the state is donated
    return metrics

  metrics = None
  for _ in range(options.warmup):
    metrics = call()
  jax.block_until_ready(metrics)
  seconds = timing.back_to_back_seconds(call, options.steps)
  losses = {k: float(v) for k, v in jax.device_get(call()).items() if k.endswith("loss")}
  result = {"program": "train_step", "compile_s": compile_s, "batch": batch,
            "num_devices": mesh.size, "flops_per_step": step_flops,
            "memory": memory(compiled), "allocator_peak": allocator_peak(jax.devices()[0]),
            "total_loss": losses.get("total_loss"), "hlo_ops": _as_json(hlo)}
  result.update(_rates(seconds, options.steps, batch, mesh.size, step_flops, peak))
  return result


def measure_predict(config: ml_collections.ConfigDict, options: Options, peak: float,
                    log: Log = print) -> Dict[str, Any]:
  """``predict`` on one device, compiled as ``inference.Predictor`` compiles it."""
  batch = options.infer_batch
  predict, args = programs.random_predict(config, batch)
  t0 = time.perf_counter()
  compiled = predict.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  log(f"predict compiled in {compile_s:.1f} s")
  step_flops = predict_flops(config, batch)
  hlo = hlo_audit.op_dtypes(compiled.as_text())

  def call():
    return compiled(*args)

  for _ in range(options.warmup):
    jax.block_until_ready(call())
  seconds = timing.back_to_back_seconds(call, options.steps)
  result = {"program": "predict", "compile_s": compile_s, "batch": batch, "num_devices": 1,
            "flops_per_step": step_flops, "memory": memory(compiled),
            "allocator_peak": allocator_peak(jax.devices()[0]), "hlo_ops": _as_json(hlo)}
  result.update(_rates(seconds, options.steps, batch, 1, step_flops, peak))
  return result


def run(options: Options, log: Log = print,
        config: Optional[ml_collections.ConfigDict] = None) -> Dict[str, Any]:
  """Both measurements as a JSON-able dict; ``config`` overrides :func:`recipe_config`."""
  device = jax.devices()[0]
  peak, peak_source = peak_flops(device, log)
  out = {"device_kind": device.device_kind, "platform": device.platform,
         "num_devices": jax.device_count(), "jax": jax.__version__,
         "peak_flops": peak, "peak_flops_source": peak_source,
         "options": dataclasses.asdict(options)}
  n = jax.local_device_count()
  if options.train:
    train_config = config or recipe_config(options, options.train_batch * n)
    train_config.train.batch_size = options.train_batch * n
    out["train"] = measure_train(train_config, options, peak, log)
    log(describe(out["train"]))
  if options.infer:
    out["predict"] = measure_predict(config or recipe_config(options, options.infer_batch),
                                     options, peak, log)
    log(describe(out["predict"]))
  return out


def input_rate(options: Options, train: Optional[Dict[str, Any]], data_dir: str,
               num_images: int = 64, steps: int = 10, log: Log = print) -> Dict[str, Any]:
  """The training input pipeline at the recipe's shapes (needs TensorFlow): images per CPU
  core-second, and the cores a node of 8 devices would need to feed ``train``'s measured rate.

  The COCO recipes' input: shorter side 800, longer at most 1333, in the buckets 832x1344 /
  1344x832 (the 832x1344 options) or else padded to the options' shape.
  """
  from mrcnn_jax.benchmarks import input_pipeline  # pylint: disable=import-outside-toplevel
  input_pipeline.ensure_shapes_set(data_dir, num_images, 640, log)
  h, w = options.height, options.width
  buckets = ((h, w), (w, h)) if h != w else ()
  result = input_pipeline.measure(data_dir, options.train_batch, steps, 2, max(h, w), 800, 1333,
                                  buckets)
  log(result.describe())
  per_core = result.images / result.cpu_s
  out = {"images_per_s_wall": result.images / result.wall_s, "images_per_core_s": per_core}
  if train:
    out["cores_for_8_devices"] = 8 * train["images_per_s_per_device"] / per_core
  return out


def describe(r: Dict[str, Any]) -> str:
  """One line per measurement."""
  mem = r["memory"].get("total")
  peak = r.get("allocator_peak")
  return (f"{r['program']}: batch {r['batch']} on {r['num_devices']} device(s): "
          f"{r['step_ms']:.1f} ms/step, {r['images_per_s_per_device']:.1f} img/s per device, "
          f"MFU {100 * r['mfu']:.1f}% ({r['flops_per_step'] / 1e12:.2f} TFLOP/step), "
          f"compile {r['compile_s']:.1f} s, XLA memory "
          f"{'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}"
          f"{'' if peak is None else f', allocator peak {peak / 2**30:.2f} GiB'}")
