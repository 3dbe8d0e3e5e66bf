"""The base experiment config: one ``ml_collections.ConfigDict`` with a section per package.

Each section is defined next to the code that reads it (``modeling/config.py``,
``data/config.py``, ``training/config.py``); experiments in ``experiments/`` call
:func:`get_base_config` and override what differs. Defaults are torchvision's Mask R-CNN
R50-FPN values.
"""

from __future__ import annotations

import ml_collections

from mrcnn_jax.data.config import data_config
from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.training.config import train_config


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the full default config (model, data, train sections plus a seed)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config()
  config.data = data_config()
  config.train = train_config()
  return config
