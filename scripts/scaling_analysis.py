"""The numbers behind docs/scaling.md: parameters, gradient all-reduce volume, step FLOPs.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python scripts/scaling_analysis.py --config experiments/coco_r50_fpn_1x.py

See ``mrcnn_jax.benchmarks.scaling`` for how each is measured.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: F401,E402  (TensorFlow log level)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mrcnn_jax.benchmarks import scaling  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/coco_r50_fpn_1x.py",
                                          "experiment config file")
_DEVICES = flags.DEFINE_integer("devices", 8, "devices for the collective count (fake on CPU)")
_HLO_SIZE = flags.DEFINE_integer("hlo_image_size", 256,
                                 "image side for the compiled multi-device step")


def main(argv):
  del argv
  scaling.report(_CONFIG.value, _DEVICES.value, _HLO_SIZE.value)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main)
