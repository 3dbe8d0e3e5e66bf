"""The notebook surface: `from mrcnn_jax.ops import ...` gives documented pure functions."""

import inspect

import mrcnn_jax.ops as ops


def test_every_public_op_is_exported_and_documented():
  for name in ops.__all__:
    fn = getattr(ops, name)
    assert callable(fn), name
    doc = inspect.getdoc(fn) or ""
    assert len(doc) > 40, f"{name} needs a docstring with shapes"


def test_ops_package_does_not_pull_in_tensorflow_or_flax():
  import subprocess
  import sys
  code = ("import sys, mrcnn_jax.ops; "
          "bad = [m for m in ('tensorflow', 'flax', 'torch') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
