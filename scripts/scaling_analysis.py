"""The numbers behind docs/scaling.md: parameters, gradient all-reduce volume, step FLOPs.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python scripts/scaling_analysis.py --config experiments/coco_r50_fpn_1x.py

Three measurements, all from the real model and the real jitted train step (no hand counts):

* **Parameters**: total, trainable (``trainable_mask``) and frozen, from ``jax.eval_shape`` of
  the initialiser.
* **Train-step FLOPs per image** at the config's image size, from XLA's cost analysis of the
  lowered (not compiled) train step on one device with one image. Forward + backward + update.
* **Collectives in the data-parallel step**: the train step is compiled over ``--devices`` fake
  CPU devices (small images: the gradient all-reduce does not depend on the image size) and the
  optimised HLO is scanned for ``all-reduce`` / ``all-gather`` / ``reduce-scatter`` /
  ``collective-permute`` ops and their operand bytes, to check that the only per-step traffic is
  one all-reduce of the trainable gradients (plus a few scalars).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: F401,E402  (TensorFlow log level)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from mrcnn_jax import modeling  # noqa: E402
from mrcnn_jax import training  # noqa: E402
from mrcnn_jax.modeling import conv as conv_lib  # noqa: E402
from mrcnn_jax.training import collectives as collectives_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/coco_r50_fpn_1x.py",
                                          "experiment config file")
_DEVICES = flags.DEFINE_integer("devices", 8, "devices for the collective count (fake on CPU)")
_HLO_SIZE = flags.DEFINE_integer("hlo_image_size", 256,
                                 "image side for the compiled multi-device step")

def abstract_batch(config, batch: int, height: int, width: int, mesh) -> dict:
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
  sharding = training.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in spec.items()}


def count_parameters(config) -> dict:
  model = modeling.MaskRCNN(config.model)
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


def _step_and_state(config, mesh):
  model = modeling.MaskRCNN(config.model)
  state = training.create_train_state(config, model, jax.random.PRNGKey(0), mesh)
  step_fn = training.make_train_step(config, model, mesh, state)
  return step_fn, state


def step_flops_per_image(config) -> float:
  """XLA's FLOP estimate of one train step on one image at ``config.data.image_size``."""
  config = config.copy_and_resolve_references()
  config.train.batch_size = 1
  mesh = training.make_mesh(jax.devices()[:1])
  step_fn, state = _step_and_state(config, mesh)
  h, w = config.data.image_size
  batch = abstract_batch(config, 1, h, w, mesh)
  # Count the convolutions accelerators run, not the CPU's Winograd form (4x fewer FLOPs).
  with conv_lib.xla_convolutions():
    lowered = step_fn.lower(state, batch)
  return float(lowered.cost_analysis()["flops"])


def collectives(config, num_devices: int, image_size: int) -> dict:
  """Counts and bytes of each collective in the compiled data-parallel train step."""
  config = config.copy_and_resolve_references()
  config.data.image_size = (image_size, image_size)
  config.train.batch_size = num_devices
  mesh = training.make_mesh(jax.devices()[:num_devices])
  step_fn, state = _step_and_state(config, mesh)
  batch = abstract_batch(config, num_devices, image_size, image_size, mesh)
  t0 = time.perf_counter()
  hlo = step_fn.lower(state, batch).compile().as_text()
  compile_s = time.perf_counter() - t0
  found = collectives_lib.collective_stats(hlo)
  return {"compile_seconds": compile_s, **found}


def main(argv):
  del argv
  config = _CONFIG.value
  params = count_parameters(config)
  print(f"parameters: total {params['total']:,}  trainable {params['trainable']:,}  "
        f"frozen {params['total'] - params['trainable']:,}")
  for name, n in sorted(params["by_module"].items()):
    print(f"  {name:12s} {n:,}")
  print(f"trainable gradient bytes (float32): {params['trainable'] * 4 / 2**20:.1f} MiB")
  h, w = config.data.image_size
  flops = step_flops_per_image(config)
  print(f"train step FLOPs per image at {h}x{w} ({config.model.compute_dtype}): "
        f"{flops / 1e9:.1f} GFLOP")
  n = min(_DEVICES.value, jax.device_count())
  found = collectives(config, n, _HLO_SIZE.value)
  print(f"collectives in the compiled {n}-device train step "
        f"({_HLO_SIZE.value}px, compiled in {found.pop('compile_seconds'):.0f} s):")
  for name, v in found.items():
    print(f"  {name:20s} ops {v['ops']:4d}  bytes {v['bytes']:,} ({v['bytes'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main)
