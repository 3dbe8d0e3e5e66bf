"""The numbers behind docs/scaling.md: parameters, gradient all-reduce volume, step FLOPs.

All from the real model and the real jitted train step (no hand counts):

* **Parameters**: total, trainable (``trainable_mask``) and frozen, from ``jax.eval_shape`` of
  the initialiser.
* **Train-step FLOPs per image** at the config's image size, from XLA's cost analysis of the
  lowered (not compiled) train step on one device with one image. Forward + backward + update.
* **Collectives in the data-parallel step**: the train step compiled over several devices (fake
  CPU devices will do; small images: the gradient all-reduce does not depend on the image size),
  its optimised HLO scanned for collective ops and their bytes, to check that the only per-step
  traffic is one all-reduce of the trainable gradients (plus a few scalars).
"""

from __future__ import annotations

import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax import modeling
from mrcnn_jax.benchmarks import collectives as collectives_lib
from mrcnn_jax.benchmarks import programs


def abstract_batch(config: ml_collections.ConfigDict, batch: int, height: int, width: int,
                   mesh: jax.sharding.Mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  """``jax.ShapeDtypeStruct``s of one batch per the batch contract, split over ``mesh``."""
  g, s = int(config.data.max_instances), int(config.data.mask_size)
  spec = {
      "image": ((batch, height, width, 3), jnp.uint8),
      "gt_boxes": ((batch, g, 4), jnp.float32),
      "gt_classes": ((batch, g), jnp.int32),
      "gt_masks": ((batch, g, s, s), jnp.uint8),
      "gt_valid": ((batch, g), jnp.bool_),
      "image_id": ((batch,), jnp.int32),
      "original_size": ((batch, 2), jnp.int32),
      "image_scale": ((batch, 2), jnp.float32),
      "valid_size": ((batch, 2), jnp.int32),
      "example_valid": ((batch,), jnp.bool_),
  }
  sharding = programs.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in spec.items()}


def count_parameters(config: ml_collections.ConfigDict) -> dict:
  """``{'total': n, 'trainable': n, 'by_module': {top-level module: n}}`` of the model."""
  model = programs.build_model(config)
  variables = jax.eval_shape(lambda k: modeling.init_variables(model, k, (64, 64)),
                             jax.random.PRNGKey(0))
  params = variables["params"]
  mask = modeling.trainable_mask(params, config.model)
  sizes = [int(np.prod(p.shape)) for p in jax.tree.leaves(params)]
  trainable = [int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(mask)) if m]
  by_module = {}
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    top = str(getattr(path[0], "key", path[0]))
    by_module[top] = by_module.get(top, 0) + int(np.prod(p.shape))
  return {"total": sum(sizes), "trainable": sum(trainable), "by_module": by_module}


def _step_and_state(config, mesh, kernel_set=None):
  model = programs.build_model(config, mesh, kernel_set)
  state = programs.train_state(config, model, mesh)
  return programs.train_step(config, model, mesh, state), state


def step_flops_per_image(config: ml_collections.ConfigDict) -> float:
  """XLA's FLOP estimate of one train step on one image at ``config.data.image_size``."""
  config = config.copy_and_resolve_references()
  config.train.batch_size = 1
  mesh = programs.make_mesh(jax.devices()[:1])
  # Count the convolutions accelerators run, not the CPU's Winograd form (4x fewer FLOPs).
  step_fn, state = _step_and_state(config, mesh, modeling.PLAIN)
  h, w = config.data.image_size
  batch = abstract_batch(config, 1, h, w, mesh)
  return float(step_fn.lower(state, batch).cost_analysis()["flops"])


def step_collectives(config: ml_collections.ConfigDict, num_devices: int,
                     image_size: int) -> dict:
  """Counts and bytes of each collective in the train step compiled over ``num_devices``, with
  ``compile_seconds``."""
  config = config.copy_and_resolve_references()
  config.data.image_size = (image_size, image_size)
  config.train.batch_size = num_devices
  mesh = programs.make_mesh(jax.devices()[:num_devices])
  step_fn, state = _step_and_state(config, mesh)
  batch = abstract_batch(config, num_devices, image_size, image_size, mesh)
  t0 = time.perf_counter()
  hlo = step_fn.lower(state, batch).compile().as_text()
  compile_s = time.perf_counter() - t0
  return {"compile_seconds": compile_s, **collectives_lib.collective_stats(hlo)}


def report(config: ml_collections.ConfigDict, devices: int, hlo_image_size: int,
           log: Callable[[str], None] = print) -> None:
  """Logs the three measurements, line by line (the collectives over ``min(devices, device
  count)`` devices at ``hlo_image_size`` px)."""
  params = count_parameters(config)
  log(f"parameters: total {params['total']:,}  trainable {params['trainable']:,}  "
      f"frozen {params['total'] - params['trainable']:,}")
  for name, n in sorted(params["by_module"].items()):
    log(f"  {name:12s} {n:,}")
  log(f"trainable gradient bytes (float32): {params['trainable'] * 4 / 2**20:.1f} MiB")
  h, w = config.data.image_size
  flops = step_flops_per_image(config)
  log(f"train step FLOPs per image at {h}x{w} ({config.model.compute_dtype}): "
      f"{flops / 1e9:.1f} GFLOP")
  n = min(devices, jax.device_count())
  found = step_collectives(config, n, hlo_image_size)
  log(f"collectives in the compiled {n}-device train step "
      f"({hlo_image_size}px, compiled in {found.pop('compile_seconds'):.0f} s):")
  for name, v in found.items():
    log(f"  {name:20s} ops {v['ops']:4d}  bytes {v['bytes']:,} ({v['bytes'] / 2**20:.1f} MiB)")
