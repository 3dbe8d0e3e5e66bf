"""Test-wide set-up.

Eight fake CPU devices are requested *before* JAX is imported anywhere, so multi-device tests
(data-parallel train step, sharded input) run in-process; single-device code is unaffected
(computations run on device 0).
"""

import os
import shutil
import tempfile

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

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_own_cache_dir = None  # set in the process that made the session's cache (and removes it)


def pytest_configure(config):
  """One persistent JAX compilation cache for the session: the xdist workers and every process
  a test starts (scripts, notebooks, the README) inherit it, so a program compiled once (the
  shapes model's train step or predict program at a size) is loaded, not compiled, the next
  time, in any of them. Made by the first process (the xdist controller), removed by it."""
  del config
  global _own_cache_dir
  if _CACHE_ENV not in os.environ:  # an xdist worker inherits the controller's
    _own_cache_dir = tempfile.mkdtemp(prefix="mrcnn_jax_tests_jax_cache_")
    os.environ[_CACHE_ENV] = _own_cache_dir


def pytest_unconfigure(config):
  del config
  if _own_cache_dir:
    shutil.rmtree(_own_cache_dir, ignore_errors=True)


@pytest.fixture
def rng():
  """A fresh numpy Generator with a fixed seed per test."""
  return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
  """Modules with ``slow`` tests first, so that workers draw the short modules last and finish
  together. Under pytest-xdist (``make test``: ``--dist loadfile``, each module on one worker,
  so a module fixture is built once) this order holds only with ``--no-loadscope-reorder``;
  by default xdist orders the modules by their number of tests.

  (``--dist loadgroup`` would group by ``xdist_group`` marks, but with pytest 9 xdist 3.8 cannot
  rename the test ids it groups by, so every test is dispatched on its own.)
  """
  del config
  slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable
