"""XLA compiler options for the compiled ``MaskRCNN.predict``.

:func:`compiler_options` is what ``predict`` compiles with in ``inference.Predictor``, the
evaluator and the benchmarks; :func:`jit_predict` is that ``jax.jit``::

    predict = kernels.jit_predict(model)      # predict(variables, images[, valid_size])

**What it changes, and why.** XLA:CPU hands every dot to YNNPACK by default
(``xla_cpu_experimental_ynn_fusion_type`` = individual dots, individual convolutions,
reductions). The Winograd convolutions (``kernels/winograd.py``) are batched products
``[P, tiles, C] x [P, C, O]`` with few tiles per product, which YNNPACK runs on one core and
XLA's own (Eigen) dot on all of them; so on CPU the dots go to Eigen, and YNNPACK keeps the
convolutions and reductions (docs/benchmarks.md has the measurements). The train step gains
nothing from it, so ``training.make_train_step`` keeps XLA's defaults.

Results differ from the default compilation only by float32 summation order; with an untrained
model's near-tied scores that can reorder detections.

Elsewhere (GPU, TPU) this returns ``{}``. A jaxlib that does not know the option (it is marked
experimental) gets ``{}`` as well, with a warning, rather than a failing compile.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

# XLA:CPU's default YNNPACK fusion types without the dots.
CPU_YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                        "LIBRARY_FUSION_TYPE_REDUCE")
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(backend: Optional[str] = None) -> Dict[str, str]:
  """``compiler_options`` for compiling ``MaskRCNN.predict`` on ``backend``.

  Args:
    backend: 'cpu', 'gpu', 'tpu', ...; default ``jax.default_backend()``.

  Returns:
    On CPU ``{'xla_cpu_experimental_ynn_fusion_type': <convolutions and reductions>}``: dots
    compile to XLA's Eigen runtime instead of YNNPACK (see the module docstring). ``{}`` on
    other backends, or where this jaxlib rejects the option.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return {}
  return dict(_cpu_options())


@functools.lru_cache(maxsize=None)
def _cpu_options() -> tuple:
  options = {_YNN_OPTION: ",".join(CPU_YNN_FUSION_TYPES)}
  # One tiny CPU compile per process: an unknown option or enum value fails here, not later.
  probe = jax.device_put(np.zeros((8, 8), np.float32), jax.devices("cpu")[0])
  try:
    jax.jit(lambda a: a @ a, compiler_options=options).lower(probe).compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, ValueError, ...)
    logging.warning("XLA:CPU does not accept %s (%s); compiling predict with XLA's defaults.",
                    options, str(e).splitlines()[0][:200])
    return ()
  return tuple(options.items())


def jit_predict(model: Any, **jit_kwargs) -> Callable:
  """``jax.jit`` of ``model``'s ``predict``, compiled with :func:`compiler_options`.

  Returns ``predict(variables, images, valid_size=None)`` (``MaskRCNN.predict``'s arguments
  after the variables). ``jit_kwargs`` go to ``jax.jit`` (e.g. ``in_shardings``); with the CPU
  kernels, pass it the variables of ``kernels.prepare_inference`` for the fastest inference.
  """
  return jax.jit(
      lambda variables, images, valid_size=None: model.apply(
          variables, images, valid_size, method=type(model).predict),
      compiler_options=compiler_options(), **jit_kwargs)
