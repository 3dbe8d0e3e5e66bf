"""What a compiled program communicates: collective ops and their bytes, from its HLO text.

``collective_stats(jitted.lower(...).compile().as_text())`` gives, per collective kind, how many
ops the optimised program runs and how many bytes their results hold. A data-parallel train
step should show one all-reduce of the trainable gradients (plus a few scalars) and nothing
that grows with the batch or the image size; ``scaling.step_collectives`` and
tests/benchmarks/test_collectives.py check that.
"""

from __future__ import annotations

import re
from typing import Dict

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
# "%name = <shape> <op>(" with an optional ROOT; the shape may be a tuple "(f32[2], bf16[3,4])".
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+([a-z][a-z-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape such as ``f32[256,3,3,64]{3,2,1,0}`` or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * (
          _DTYPE_BYTES[dtype])
  return total


def collective_stats(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """``{kind: {'ops': count, 'bytes': result bytes}}`` for each kind in :data:`COLLECTIVES`.

  Async pairs (``all-reduce-start`` / ``-done``) are counted once, at the start. The bytes are
  the size of each op's result, i.e. the per-device buffer being reduced or gathered (not the
  bytes on the wire, which depend on the algorithm: a ring all-reduce sends ~2x the buffer).
  An async ``all-gather-start`` result also holds its input, so it counts a little high.
  """
  found = {kind: {"ops": 0, "bytes": 0} for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    op = m.group(2)
    if op.endswith("-done"):
      continue
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in found:
      found[kind]["ops"] += 1
      found[kind]["bytes"] += shape_bytes(m.group(1))
  return found
