r"""Recipe-scale speed: train step and inference at a COCO recipe's shape, on this backend.

R50-FPN (91 classes) at 832x1344 (the 1x/3x recipes' landscape bucket), bfloat16, 8 images per
device: step time, images/s per device, compile time, memory and MFU
(``mrcnn_jax.benchmarks.recipe``). Needs JAX, Flax, optax, orbax and ml_collections; not
TensorFlow, pycocotools or torch (except ``--input_pipeline``, which times the tf.data input).

Usage::

  XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/benchmark_recipe.py --out recipe.json
  python scripts/benchmark_recipe.py --remat none,blocks --skip_predict
  python scripts/benchmark_recipe.py --height 1024 --width 1024    # the LSJ recipe's square
"""

import functools
import json
import tempfile

from absl import app
from absl import flags
from absl import logging

from mrcnn_jax import modeling
from mrcnn_jax.benchmarks import recipe
import _cli  # scripts/_cli.py

_HEIGHT = flags.DEFINE_integer("height", 832, "Padded input height.", lower_bound=128)
_WIDTH = flags.DEFINE_integer("width", 1344, "Padded input width.", lower_bound=128)
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 8, "Training images per device.", lower_bound=1)
_INFER_BATCH = flags.DEFINE_integer("infer_batch", 8, "Inference batch (one device).",
                                    lower_bound=1)
_DTYPE = flags.DEFINE_enum("compute_dtype", "bfloat16", ["bfloat16", "float32"],
                           "Activation dtype (params, box math and losses stay float32).")
_REMAT = flags.DEFINE_list("remat", ["none"], "config.model.backbone.remat values; one train "
                           "measurement each, in order.")
flags.register_validator("remat", lambda values: set(values) <= set(modeling.REMAT_CHOICES),
                         f"--remat takes values of {modeling.REMAT_CHOICES}")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per program.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before timing.", lower_bound=1)
_SKIP_TRAIN = flags.DEFINE_bool("skip_train", False, "Measure predict only.")
_SKIP_PREDICT = flags.DEFINE_bool("skip_predict", False, "Measure the train step only.")
_INPUT = flags.DEFINE_bool("input_pipeline", False, "Also time the input pipeline at these "
                           "shapes (needs TensorFlow) and the cores 8 devices would need.")
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON (after each program).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  log = functools.partial(print, flush=True)
  options = recipe.Options(height=_HEIGHT.value, width=_WIDTH.value,
                           train_batch=_TRAIN_BATCH.value, infer_batch=_INFER_BATCH.value,
                           compute_dtype=_DTYPE.value, steps=_STEPS.value, warmup=_WARMUP.value)
  results = []

  def save(result):
    results.append(result)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=1)

  runs = [] if _SKIP_TRAIN.value else [dict(remat=r, train=True, infer=False)
                                        for r in _REMAT.value]
  if not _SKIP_PREDICT.value:
    runs.append(dict(remat=_REMAT.value[0], train=False, infer=True))
  for run in runs:
    opts = recipe.Options(**{**options.__dict__, **run})
    log(f"--- {'train' if run['train'] else 'predict'} {opts.height}x{opts.width} "
        f"{opts.compute_dtype}, remat {opts.remat}")
    save(recipe.run(opts, log))
  if _INPUT.value:
    train = next((r["train"] for r in results if "train" in r), None)
    with tempfile.TemporaryDirectory(prefix="recipe_input_") as data_dir:
      rate = recipe.input_rate(options, train, data_dir, log=log)
    if train:
      log(f"input: {rate['images_per_core_s']:.1f} images per core-second; 8 devices at "
          f"{train['images_per_s_per_device']:.1f} img/s each need "
          f"{rate['cores_for_8_devices']:.0f} cores")
    save({"input_pipeline": rate})


if __name__ == "__main__":
  app.run(lambda argv: _cli.run_main(main, argv), flags_parser=_cli.parse_flags)
