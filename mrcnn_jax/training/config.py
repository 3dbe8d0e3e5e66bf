"""Training settings (``config.train``)."""

from __future__ import annotations

import ml_collections


def train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 16  # global batch over all hosts and devices
  c.num_steps = 90_000
  return c
