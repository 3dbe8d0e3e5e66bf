"""The seam between the model and platform-specific kernels.

A :class:`KernelSet` names the implementation of each piece that has a faster form on some
platform: the 2-D conv layer, the mask predictor and RoIAlign's pooling. The model takes one as
an attribute (``MaskRCNN(config, kernels=...)``) and hands each piece to the layers that use it,
so the algorithm is fixed where the program is built, never by a global read inside a layer.

:data:`PLAIN` is plain Flax / ``lax`` (what a TPU or GPU compiles, readable like the paper);
``mrcnn_jax.kernels.select()`` returns the CPU set on CPU. Every set has the same parameters
(names, shapes, initialisers), so checkpoints move freely between them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

from mrcnn_jax.modeling import layers
from mrcnn_jax.modeling import roi_heads


@dataclasses.dataclass(frozen=True)
class KernelSet:
  """Implementations of the model's platform-sensitive pieces.

  Attributes:
    conv: 2-D conv module class with ``flax.linen.Conv``'s constructor fields and parameters
      (``kernel`` [kh, kw, in, out] HWIO, ``bias`` [out]).
    mask_predictor: module class ``(num_classes, dtype)`` called as ``(x, classes=None)``,
      with ``roi_heads.MaskRCNNPredictor``'s parameters and outputs.
    pool_rois: RoIAlign's pooling of every RoI (``ops.roi_align.pool_all_rois``'s signature),
      or None for that plain one.
    init_key: maps the key given to ``modeling.init_variables`` to the one parameters are
      drawn with, or None to draw with the key as given.
    inference_collections: variable collections of precomputed inference state the set's
      layers read (training refuses variables that carry them).
  """

  conv: Any = layers.Conv
  mask_predictor: Any = roi_heads.MaskRCNNPredictor
  pool_rois: Optional[Callable[..., Any]] = None
  init_key: Optional[Callable[[Any], Any]] = None
  inference_collections: Tuple[str, ...] = ()


PLAIN = KernelSet()
