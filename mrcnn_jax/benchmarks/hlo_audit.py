"""Which dtype a program's convolutions and matmuls run in, read from its HLO.

A bfloat16 step should have no float32 island in its hot path: :func:`op_dtypes` counts the
convolutions and dot products of a program by result dtype, in StableHLO (``lowered.as_text()``:
what the model asked for) or in XLA's optimised HLO (``compiled.as_text()``: what runs, where
GPU convolutions and matmuls are cuDNN / cuBLAS custom calls).
"""

from __future__ import annotations

import collections
import re
from typing import Counter, Tuple

_STABLEHLO = re.compile(r"stablehlo\.(convolution|dot_general)\b.*->\s*tensor<(?:[0-9?]+x)*(\w+)>")
_HLO_RESULT = re.compile(r"=\s*\(?([a-z]+[0-9]*)\[")


def _hlo_kind(line: str) -> str:
  if " convolution(" in line or "__cudnn$conv" in line:
    return "convolution"
  if " dot(" in line or "__cublas$" in line:
    return "dot"
  return ""


def op_dtypes(hlo_text: str) -> Counter[Tuple[str, str]]:
  """``{(op, result dtype): count}``: op is ``'convolution'`` or ``'dot'``, dtype as the text
  spells it (``bf16``, ``f32``); ``dot_general`` of StableHLO is counted as ``'dot'``."""
  counts: Counter[Tuple[str, str]] = collections.Counter()
  for line in hlo_text.splitlines():
    m = _STABLEHLO.search(line)
    if m:
      counts[("dot" if m.group(1) == "dot_general" else "convolution", m.group(2))] += 1
      continue
    kind = _hlo_kind(line)
    if kind:
      r = _HLO_RESULT.search(line)
      if r:
        counts[(kind, r.group(1))] += 1
  return counts


def float32_ops(hlo_text: str) -> Counter[str]:
  """``{op: count}`` of the float32 convolutions and dots (see :func:`op_dtypes`)."""
  return collections.Counter({op: n for (op, dtype), n in op_dtypes(hlo_text).items()
                              if dtype == "f32"})
