"""Test-wide set-up.

Eight fake CPU devices are requested *before* JAX is imported anywhere, so multi-device tests
(data-parallel train step, sharded input) run in-process; single-device code is unaffected
(computations run on device 0).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the torch oracle stays on the CPU

# torchvision segfaults when it is imported *after* TensorFlow (seen with torch 2.14.1,
# torchvision 0.29.1, tensorflow-cpu 2.21), so the oracle is loaded first, before any test
# module can pull TensorFlow in.
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fresh numpy Generator with a fixed seed per test."""
  return np.random.default_rng(0)
