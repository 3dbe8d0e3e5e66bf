"""Runs a ``predict`` exported by :mod:`mrcnn_jax.inference.export`, with ``jax`` and ``numpy`` only.

This file imports nothing from ``mrcnn_jax``, Flax or TensorFlow, so a serving process needs only
``jax`` (and the jaxlib plugin of its accelerator). ``export.save`` copies it next to the
artifact; import it from there::

    import sys; sys.path.insert(0, "export/r50")
    import exported
    predict = exported.load("export/r50")      # predict.jax + predict.json [+ weights.npz]
    out = predict(images)                       # [B, H, W, 3] uint8 at the exported shape
    out["boxes"], out["scores"], out["classes"], out["masks"], out["valid"]

The artifact is a serialized ``jax.export.Exported`` (StableHLO, lowered for every platform it
names); ``predict.json`` beside it names and shapes its inputs and outputs, and records the
classes, the score threshold and the versions it was exported with.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import jax
from jax import export as jax_export
import numpy as np

ARTIFACT_FILE = "predict.jax"
SIDECAR_FILE = "predict.json"
WEIGHTS_FILE = "weights.npz"
FORMAT = "mrcnn_jax.predict/1"

Weights = Union[str, Mapping[str, Any]]


def _dtype(name: str) -> np.dtype:
  return jax.numpy.dtype(name)  # knows bfloat16, which numpy alone does not


def _describe(shape: Sequence[int], dtype: Any) -> str:
  return f"[{', '.join(str(int(d)) for d in shape)}] {np.dtype(dtype).name}"


class ExportedPredict:
  """An exported ``predict``, deserialized and ready to call.

  Args:
    serialized: the bytes of ``predict.jax``.
    sidecar: the parsed ``predict.json``.
    weights: only for an artifact exported with ``weights='argument'``: a ``.npz`` path or a
      mapping ``{'params/backbone/...': array}`` holding exactly the leaves the sidecar lists.
      They are put on the default device once, here.

  Attributes:
    sidecar: the parsed ``predict.json``.
    batch_size, image_size: the static input, ``B`` and ``(H, W)``.
    classes: ``[{'index': 1.., 'name', 'category_id'}]`` of the foreground classes.
    score_threshold: detections scoring below it are already marked invalid.

  Raises:
    ValueError: not an artifact of this format, exported for none of this JAX's platforms,
      or weights missing, extra or of the wrong shape or dtype.
  """

  def __init__(self, serialized: bytes, sidecar: Mapping[str, Any],
               weights: Optional[Weights] = None):
    if sidecar.get("format") != FORMAT:
      raise ValueError(f"not an mrcnn_jax predict sidecar: format {sidecar.get('format')!r}, "
                       f"expected {FORMAT!r}")
    self.sidecar = dict(sidecar)
    self._check_platform()
    self._exported = jax_export.deserialize(bytearray(serialized))
    self._inputs = [(i["name"], tuple(i["shape"]), _dtype(i["dtype"]))
                    for i in sidecar["inputs"]]
    self.batch_size = int(sidecar["batch_size"])
    self.image_size = tuple(int(v) for v in sidecar["image_size"])
    self.classes = list(sidecar["classes"])
    self.score_threshold = float(sidecar["score_threshold"])
    self._weights = None
    if sidecar["weights"] == "argument":
      if weights is None:
        raise ValueError("this artifact takes its weights as an argument: pass weights= (a .npz "
                         "path or a dict of the leaves predict.json lists)")
      self._weights = self._load_weights(weights)
    elif weights is not None:
      raise ValueError("this artifact has its weights baked in; do not pass weights=")
    # One jit around the call: compiled on the first call, cached for the following ones,
    # with the compiler options the exporter recorded for this platform.
    self._call = jax.jit(self._exported.call, compiler_options=self._compiler_options() or None)

  def _compiler_options(self) -> Dict[str, str]:
    """The sidecar's options for this backend, or none where this XLA rejects them."""
    options = self.sidecar.get("compiler_options", {}).get(jax.default_backend(), {})
    if not options:
      return {}
    try:
      jax.jit(lambda a: a + 1, compiler_options=options).lower(np.zeros(2, np.float32)).compile()
    except Exception:  # pylint: disable=broad-except  # an XLA that does not know an option
      return {}
    return dict(options)

  def _check_platform(self) -> None:
    backend = jax.default_backend()
    names = {"gpu": ("cuda", "rocm")}.get(backend, (backend,))
    platforms = self.sidecar["platforms"]
    if not any(n in platforms for n in names):
      raise ValueError(f"the artifact was exported for {', '.join(platforms)}; this JAX runs on "
                       f"{backend}: export it again with that platform")

  def _load_weights(self, weights: Weights) -> Dict[str, jax.Array]:
    if isinstance(weights, (str, os.PathLike)):
      with np.load(weights) as f:
        weights = {k: f[k] for k in f.files}
    leaves = {l["name"]: (tuple(l["shape"]), _dtype(l["dtype"]))
              for l in self.sidecar["weight_leaves"]}
    missing = sorted(set(leaves) - set(weights))
    extra = sorted(set(weights) - set(leaves))
    if missing or extra:
      raise ValueError(f"weights do not match the artifact: {len(missing)} missing "
                       f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    out = {}
    for name, (shape, dtype) in leaves.items():
      value = weights[name]
      if tuple(value.shape) != shape or np.dtype(value.dtype) != dtype:
        raise ValueError(f"weight {name} must be {_describe(shape, dtype)}, got "
                         f"{_describe(value.shape, value.dtype)}")
      out[name] = jax.device_put(value)
    return out

  def _check(self, name: str, value: Any) -> Any:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
      value = np.asarray(value)
    shape, dtype = next((s, d) for n, s, d in self._inputs if n == name)
    if tuple(value.shape) != shape or np.dtype(value.dtype) != dtype:
      raise ValueError(f"{name} must be {_describe(shape, dtype)} (the exported shape), got "
                       f"{_describe(value.shape, value.dtype)}")
    return value

  def __call__(self, images: Any, valid_size: Any = None) -> Dict[str, jax.Array]:
    """Detections of a batch at the exported shape.

    Args:
      images: [B, H, W, 3] RGB at the exported shape and dtype (uint8, or float32 in
        0..255), each image zero-padded at bottom/right.
      valid_size: [B, 2] int32 (h, w) of each image before padding; default (H, W).

    Returns:
      The exported program's outputs as device arrays, named and shaped as
      ``sidecar['outputs']`` says: ``boxes`` [B, D, 4] float32 xyxy input pixels, ``scores``
      [B, D], ``classes`` [B, D] int32 (1..K), ``masks`` [B, D, 28, 28] float32, ``valid``
      [B, D] bool (and ``image_masks`` [B, D, H, W] float32 if pasted).

    Raises:
      ValueError: an input of another shape or dtype than the exported one.
    """
    if valid_size is None:
      valid_size = np.tile(np.asarray(self.image_size, np.int32), (self.batch_size, 1))
    args = (self._check("images", images), self._check("valid_size", valid_size))
    if self._weights is not None:
      args = (self._weights,) + args
    return self._call(*args)


def read_sidecar(directory: str) -> Dict[str, Any]:
  """``predict.json`` of an artifact folder."""
  with open(os.path.join(directory, SIDECAR_FILE)) as f:
    return json.load(f)


def load(directory: str, weights: Optional[Weights] = None) -> ExportedPredict:
  """Loads the artifact in ``directory`` (a local folder).

  Args:
    directory: holds ``predict.jax`` and ``predict.json`` (and ``weights.npz`` when exported
      with ``weights='argument'``, used unless ``weights`` is given).
    weights: see :class:`ExportedPredict`.
  """
  sidecar = read_sidecar(directory)
  if weights is None and sidecar.get("weights") == "argument" and sidecar.get("weights_file"):
    path = os.path.join(directory, sidecar["weights_file"])
    weights = path if os.path.isfile(path) else None
  with open(os.path.join(directory, sidecar.get("artifact", ARTIFACT_FILE)), "rb") as f:
    serialized = f.read()
  return ExportedPredict(serialized, sidecar, weights)
