"""benchmarks.profiling: op_name parsing, and per-module times from a real profiler trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.benchmarks import profiling as profile_model

def test_module_of_drops_wrappers_control_flow_and_the_primitive():
  op = ("jit(<lambda>)/MaskRCNN.predict/MaskRCNN._box_branch/cond/branch_0_fun/"
        "MaskRCNN._head/box_head/fc6/dot_general")
  assert profile_model.module_of(op, 2) == "_box_branch/_head"
  assert profile_model.module_of(op, 99) == "_box_branch/_head/box_head/fc6"
  nms = "jit(<lambda>)/MaskRCNN.predict/vmap(jit(_batched_nms_jit))/jit(argsort)/sort"
  assert profile_model.module_of(nms, 2) == "_batched_nms_jit/argsort"
  assert profile_model.module_of("jit(<lambda>)/MaskRCNN.predict/add", 2) == "(top level)"


def test_hlo_operations_reads_opcode_and_op_name():
  text = ('  %fusion.3 = f32[4,4]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%c, '
          'metadata={op_name="jit(f)/alpha/add" source_file="x.py"}\n'
          '  ROOT %cond.1 = (f32[2]{0}, s32[]) conditional(%i, %a, %b), '
          'branch_computations={%r0, %r1}\n')
  ops = profile_model.hlo_operations(text)
  assert ops["fusion.3"] == ("fusion", "jit(f)/alpha/add")
  assert ops["cond.1"] == ("conditional", "")


def test_profile_attributes_time_to_named_scopes():
  """Two scopes, one doing 24x the matmuls of the other: both appear, the big one dominates.

  The margin is wide on purpose: under ``pytest -n 2`` the other worker competes for the two
  cores, and one op's time can double or triple. The minimum over several runs, per op, and a
  24x workload against a 4x threshold keep the check about attribution, not about timing.
  """

  def f(x):
    with jax.named_scope("big"):
      b = x
      for _ in range(24):
        b = jnp.tanh(b @ x)
    # "small" runs after "big" (it depends on it): the first op of a run also pays the thread
    # pool's wake-up, which would otherwise be charged to "small".
    with jax.named_scope("small"):
      return jnp.tanh(b @ x)

  x = jnp.asarray(np.random.default_rng(0).standard_normal((384, 384)), jnp.float32)

  def method(v):  # as MaskRCNN.predict: the first path component, which module_of drops
    with jax.named_scope("predict"):
      return f(v)

  compiled = jax.jit(method).lower(x).compile()
  ops = profile_model.hlo_operations(compiled.as_text())
  jax.block_until_ready(compiled(x))
  times = profile_model.profile(lambda: jax.block_until_ready(compiled(x)), runs=5)
  modules = profile_model.by_module(times, ops, depth=1)
  assert modules["big"] > 4 * modules["small"] > 0, modules
