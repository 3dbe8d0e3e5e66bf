r"""Converts torchvision / Detectron2 weights into an mrcnn_jax checkpoint.

Writes ``OUTPUT/checkpoints/0`` (orbax, the trainer's checkpoint items),
``OUTPUT/model_config.json`` (the model config the weights belong to) and ``OUTPUT/config.py``
(an experiment config with that model, for ``--config OUTPUT/config.py[:H,W]`` of
``predict.py`` / ``evaluate.py``; ``H,W`` is the static input size). ``OUTPUT`` is what
``config.init_weights`` and the scripts' ``--checkpoint`` take. ``OUTPUT`` may be a
``gs://`` folder: its ``config.py`` then names that folder, so a local copy of it works as
``--config``.

Usage::

  python scripts/convert_weights.py --source torchvision \
      --input maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --output /tmp/maskrcnn_tv
  python scripts/convert_weights.py --source torchvision-v2 \
      --input maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth --output /tmp/maskrcnn_tv2
  python scripts/convert_weights.py --source torchvision-keypoint \
      --input keypointrcnn_resnet50_fpn_coco-fc266e95.pth --output /tmp/keypointrcnn_tv
  python scripts/convert_weights.py --source torchvision-resnet \
      --input resnet50-0676ba61.pth --output /tmp/r50_imagenet
  python scripts/convert_weights.py --source detectron2 --input model_final_f10217.pkl \
      --output /tmp/maskrcnn_d2   # MSRA model zoo: STRIDE_IN_1X1, BGR (the defaults)
  python scripts/convert_weights.py --source torchvision --input coco.pth --output /tmp/ft \
      --num_classes 5   # fine-tuning: class-dependent layers re-initialised
  python scripts/predict.py --config /tmp/maskrcnn_tv/config.py:1344,1344 \
      --config.data.min_size=800 --config.data.max_size=1333 \
      --checkpoint /tmp/maskrcnn_tv --images photos/ --out predictions/
"""

# torchvision segfaults if imported after TensorFlow; torch itself is imported only by the
# .pth reader, and nothing here imports TensorFlow.
import logging

from absl import app
from absl import flags

from mrcnn_jax.convert import common
from mrcnn_jax.convert import sources
from mrcnn_jax.run import paths
import _cli  # scripts/_cli.py

_SOURCE = flags.DEFINE_enum("source", None, sources.SOURCES, "Kind of weight file.")
_INPUT = flags.DEFINE_string("input", None, "Weight file (.pth or .pkl), local or gs://.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (local or gs://).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Classes including background, to fine-tune on another label set.")
_INPUT_FORMAT = flags.DEFINE_enum("d2_input_format", "BGR", ["BGR", "RGB"],
                                  "Detectron2 only: the checkpoint's INPUT.FORMAT.")
_STRIDE_IN_1X1 = flags.DEFINE_bool("d2_stride_in_1x1", True,
                                   "Detectron2 only: the checkpoint's RESNETS.STRIDE_IN_1X1.")
flags.mark_flags_as_required(["source", "input", "output"])


def _convert(_):
  # Before reading a large weight file: a missing input, bucket or permission is one line.
  paths.check_exists("--input", _INPUT.value)
  paths.check_writable_dir("--output", _OUTPUT.value)
  variables, config = sources.convert_file(
      _SOURCE.value, _INPUT.value, num_classes=_NUM_CLASSES.value,
      input_format=_INPUT_FORMAT.value, stride_in_1x1=_STRIDE_IN_1X1.value)
  path = common.save_converted(variables, config, _OUTPUT.value)
  logging.info("wrote %s and %s/%s", path, _OUTPUT.value, common.CONFIG_FILE)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.getLogger().setLevel(logging.INFO)
  # A missing file or a weight file that does not fit (ConversionError, a ValueError) is one
  # line, "error: ...", and exit status 1, as for the other scripts.
  _cli.run_main(_convert, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
