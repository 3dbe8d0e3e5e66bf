"""Input-pipeline settings (``config.data``)."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.image_size = (1024, 1024)  # (height, width) of the padded network input
  c.max_instances = 100
  c.mask_size = 112  # GT masks carried cropped to their box at this resolution
  return c
