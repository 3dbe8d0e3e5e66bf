r"""Micro-benchmark of the detection ops: jitted JAX against torchvision on this CPU.

Cases (the sizes of a Mask R-CNN R50-FPN step on an 800x1216 image, 256 channels):

* RoIAlign, 1000 RoIs -> 7x7 over P2-P5 (box head), multilevel, sampling_ratio 2;
* RoIAlign, 100 RoIs -> 14x14 over P2-P5 (mask head at test time), same;
* NMS of 4,000 and of 20,000 random boxes at IoU 0.7, max_output_size = number of boxes.

JAX: ``multilevel_roi_align`` against ``torchvision.ops.MultiScaleRoIAlign`` (both with
aligned=False), ``nms`` against ``torchvision.ops.nms``. Compilation is timed on its own
(``lower().compile()``); timed runs are the median of ``repeats`` after one warm-up call. The
torchvision side comes from ``torchvision_reference``, passed in by the entry point (this module
never imports torch).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.benchmarks import timing
from mrcnn_jax.ops.nms import nms
from mrcnn_jax.ops.roi_align import multilevel_roi_align

IMAGE = (800, 1216)
STRIDES = (4, 8, 16, 32)
CHANNELS = 256
NMS_IOU = 0.7


@dataclasses.dataclass(frozen=True)
class Case:
  """One op at one size: the jitted JAX side, the reference, and how to compare them."""
  fn: Callable  # JAX function of ``args``
  args: Tuple
  reference: Callable[[], Any]  # runs the torchvision op; its result converts with np.asarray
  check: Callable[[Any, Any], str]  # (JAX result, reference result) -> a note for the table


@dataclasses.dataclass(frozen=True)
class Result:
  label: str
  compile_s: float
  jax_s: float
  reference_s: float
  note: str


def random_boxes(rng: np.random.Generator, n: int, min_side: float,
                 max_side: float) -> np.ndarray:
  """[n, 4] float32 xyxy boxes inside ``IMAGE``, sides log-uniform in [min_side, max_side]."""
  side = np.exp(rng.uniform(np.log(min_side), np.log(max_side), (n, 2)))
  xy = rng.uniform(0.0, 1.0, (n, 2)) * (np.array([IMAGE[1], IMAGE[0]]) - side).clip(1)
  return np.concatenate([xy, xy + side], -1).astype(np.float32)


def roi_align_case(rng: np.random.Generator, num_rois: int, size: int, reference: Any) -> Case:
  """Multilevel RoIAlign of ``num_rois`` boxes spread over P2-P5 to ``size`` x ``size``."""
  feats = [rng.normal(size=(1, IMAGE[0] // s, IMAGE[1] // s, CHANNELS)).astype(np.float32)
           for s in STRIDES]
  boxes = random_boxes(rng, num_rois, 16, 700)  # spread over all four levels
  fn = lambda f, b: multilevel_roi_align(f, b, size, strides=STRIDES, sampling_ratio=2,
                                         aligned=False)
  args = ([jnp.asarray(f) for f in feats], jnp.asarray(boxes[None]))

  def check(got, want):
    want = np.asarray(want).transpose(0, 2, 3, 1)
    err = np.linalg.norm(np.asarray(got)[0] - want) / np.linalg.norm(want)
    return f"rel err {err:.1e}"
  return Case(fn, args, reference.multiscale_roi_align(feats, boxes, size, IMAGE), check)


def nms_case(rng: np.random.Generator, n: int, reference: Any) -> Case:
  """NMS of ``n`` random boxes at IoU ``NMS_IOU``, keeping up to all of them."""
  boxes = random_boxes(rng, n, 8, 300)
  scores = rng.uniform(size=n).astype(np.float32)
  fn = lambda b, s: nms(b, s, NMS_IOU, n)

  def check(got, want):
    got = np.asarray(got)
    same = np.array_equal(got[got >= 0], np.asarray(want))
    return f"{int((got >= 0).sum())} kept, {'same' if same else 'DIFFERENT'}"
  return Case(fn, (jnp.asarray(boxes), jnp.asarray(scores)),
              reference.nms(boxes, scores, NMS_IOU), check)


# name -> (label, make(rng, reference) -> Case)
CASES: Dict[str, Tuple[str, Callable[[np.random.Generator, Any], Case]]] = {
    "roi_7x7": ("RoIAlign 1000 RoIs 7x7, P2-P5, 256 ch",
                lambda r, ref: roi_align_case(r, 1000, 7, ref)),
    "roi_14x14": ("RoIAlign 100 RoIs 14x14, P2-P5, 256 ch",
                  lambda r, ref: roi_align_case(r, 100, 14, ref)),
    "nms_4k": ("NMS 4,000 boxes, IoU 0.7", lambda r, ref: nms_case(r, 4000, ref)),
    "nms_20k": ("NMS 20,000 boxes, IoU 0.7", lambda r, ref: nms_case(r, 20000, ref)),
}


def check_cases(names: Sequence[str]) -> None:
  """Raises ``ValueError`` naming any of ``names`` that is not in :data:`CASES`."""
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    raise ValueError(f"--cases: unknown {unknown}; the cases are {sorted(CASES)}")


def run_cases(names: Sequence[str], reference: Any, repeats: int, seed: int = 0,
              log: Callable[[str], None] = print) -> List[Result]:
  """Times each named case, JAX then the reference (``torchvision_reference``); each case's
  inputs are drawn from a fresh generator seeded ``seed``."""
  check_cases(names)
  results = []
  for name in names:
    label, make = CASES[name]
    case = make(np.random.default_rng(seed), reference)
    start = time.perf_counter()
    compiled = jax.jit(case.fn).lower(*case.args).compile()
    compile_s = time.perf_counter() - start
    jax_s = timing.median_wall_time(lambda: jax.block_until_ready(compiled(*case.args)), repeats)
    reference_s = timing.median_wall_time(case.reference, repeats)
    note = case.check(compiled(*case.args), case.reference())
    results.append(Result(label, compile_s, jax_s, reference_s, note))
    log(f"{label:42s} compile {compile_s:6.2f} s  jax {jax_s:8.4f} s  "
        f"torchvision {reference_s:8.4f} s  ratio {jax_s / reference_s:5.2f}  ({note})")
  return results


def format_table(results: Sequence[Result]) -> str:
  """The results as a Markdown table."""
  lines = ["| case | JAX compile (s) | JAX (s) | torchvision (s) | JAX / torchvision | check |",
           "|---|---:|---:|---:|---:|---|"]
  for r in results:
    lines.append(f"| {r.label} | {r.compile_s:.2f} | {r.jax_s:.4f} | {r.reference_s:.4f} | "
                 f"{r.jax_s / r.reference_s:.2f} | {r.note} |")
  return "\n".join(lines)
