"""Exports a model's ``predict``: a ``jax.export`` artifact or a TF SavedModel, each one file
for CPU, GPU and TPU.

  python scripts/export.py --config experiments/shapes.py --checkpoint workdirs/shapes \
      --batch_size 4 --out export/shapes
  # no checkpoint at hand: random weights, to try the artifact
  python scripts/export.py --config experiments/shapes.py --random_weights --out /tmp/export
  # a SavedModel for TF Serving (export/NAME/VERSION/)
  python scripts/export.py --config experiments/shapes.py --checkpoint workdirs/shapes \
      --format savedmodel --out export/shapes/1

With ``--format=jax``, ``--out`` receives ``predict.jax`` (the serialized program),
``predict.json`` (inputs, outputs, classes, score threshold, versions), ``exported.py`` (the
loader: jax and numpy only) and, with ``--weights=argument``, ``weights.npz``. With
``--format=savedmodel``: ``saved_model.pb``, ``variables/`` (the weights) and
``assets.extra/predict.json``. The input is static: ``--height``/``--width`` default to
``config.data.image_size``.
"""

from __future__ import annotations

import _cli  # noqa: F401
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "a workdir, checkpoint step folder or weights file (.npz, .msgpack)")
_RANDOM = flags.DEFINE_bool("random_weights", False, "export random weights (no --checkpoint)")
_OUT = flags.DEFINE_string("out", None, "output folder (local or gs://)")
_FORMAT = flags.DEFINE_enum("format", "jax", ["jax", "savedmodel"],
                            "jax: a jax.export artifact; savedmodel: a TF SavedModel for TF "
                            "Serving (weights as variables)")
_BATCH = flags.DEFINE_integer("batch_size", 1, "static batch size")
_HEIGHT = flags.DEFINE_integer("height", None, "static input height (default: the config's)")
_WIDTH = flags.DEFINE_integer("width", None, "static input width (default: the config's)")
_INPUT_DTYPE = flags.DEFINE_enum("input_dtype", "uint8", ["uint8", "float32"],
                                 "dtype of the images input (float32 in 0..255)")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                                   "activations' dtype (default: the config's)")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"],
                               "platforms to lower for, in one artifact (cpu, cuda, rocm, tpu)")
_WEIGHTS = flags.DEFINE_enum("weights", "baked", ["baked", "argument"],
                             "weights as constants in the program, or its first argument "
                             "(written as weights.npz); --format=jax only")
_PASTE = flags.DEFINE_bool("paste_masks", False,
                           "also output every mask pasted into the input size [B, D, H, W]")
_KERNELS = flags.DEFINE_enum("kernels", "auto", ["auto", "plain", "cpu"],
                             "auto: the CPU kernels (faster on XLA:CPU) for a CPU-only artifact "
                             "with baked weights, else plain (what GPUs and TPUs run)")
_SCORE = flags.DEFINE_float("score_threshold", None,
                            "detections below it are dropped (default: config.model.roi's)")
_STABLEHLO = flags.DEFINE_string(
    "stablehlo_version", None, "--format=savedmodel: StableHLO version of the serving "
    "TensorFlow (default: the installed TensorFlow's)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an artifact already in --out")
flags.mark_flags_as_required(["out"])


def _check_format_options():
  """The options a format cannot honour are refused, not ignored."""
  if _FORMAT.value == "savedmodel" and flags.FLAGS["weights"].present:
    raise ValueError("--weights is for --format=jax: a SavedModel holds its weights as variables")
  if _FORMAT.value == "savedmodel" and _KERNELS.value == "cpu":
    raise ValueError("--kernels=cpu is for --format=jax (a SavedModel takes its weights as "
                     "variables: the plain kernels)")
  if _FORMAT.value == "jax" and _STABLEHLO.value is not None:
    raise ValueError("--stablehlo_version is for --format=savedmodel")


def _export(config):
  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.inference import export
  if _FORMAT.value == "savedmodel":  # TensorFlow is imported only for a SavedModel
    from mrcnn_jax.inference import savedmodel
  # pylint: enable=g-import-not-at-top
  if bool(_CHECKPOINT.value) == _RANDOM.value:
    raise ValueError("give --checkpoint or --random_weights (one of them)")
  # Bad options fail before a model is loaded.
  _check_format_options()
  export.check_options(batch_size=_BATCH.value, platforms=_PLATFORMS.value)
  if _FORMAT.value == "savedmodel":
    savedmodel.target_stablehlo_version(_STABLEHLO.value)
    savedmodel.check_out_dir(_OUT.value, _OVERWRITE.value)
  else:
    export.check_out_dir(_OUT.value, _OVERWRITE.value)
    export.resolve_kernels(_KERNELS.value, _PLATFORMS.value, _WEIGHTS.value)
  if _RANDOM.value:
    variables, names, ids = export.random_variables(config), None, None
  else:
    variables, names, ids = export.load_checkpoint(config, _CHECKPOINT.value)
  size = (_HEIGHT.value or config.data.image_size[0], _WIDTH.value or config.data.image_size[1])
  options = dict(batch_size=_BATCH.value, image_size=size, input_dtype=_INPUT_DTYPE.value,
                 compute_dtype=_COMPUTE_DTYPE.value, platforms=_PLATFORMS.value,
                 paste_masks=_PASTE.value, score_threshold=_SCORE.value, class_names=names,
                 category_ids=ids)
  if _FORMAT.value == "savedmodel":
    artifact = savedmodel.export_savedmodel(config, variables, **options,
                                            stablehlo_version=_STABLEHLO.value)
    paths = savedmodel.save(artifact, _OUT.value, overwrite=_OVERWRITE.value)
  else:
    artifact = export.export_predict(config, variables, **options, weights=_WEIGHTS.value,
                                     kernel_name=_KERNELS.value)
    paths = export.save(artifact, _OUT.value, overwrite=_OVERWRITE.value)
  side = artifact.sidecar
  print(f"predict [{side['batch_size']}, {size[0]}, {size[1]}, 3] {side['input_dtype']} for "
        f"{', '.join(side['platforms'])}, weights {side['weights']}, kernels "
        f"{side.get('kernels', 'plain')} -> {_OUT.value} "
        f"({', '.join(sorted(paths))})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _cli.load_config_or_exit(_CONFIG)
  _cli.run_main(lambda _: _export(config), argv)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main, flags_parser=_cli.parse_flags)
