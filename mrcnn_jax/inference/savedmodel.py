"""TF SavedModels of ``MaskRCNN.predict`` for TF Serving: the ``jax.export`` program, run by TF.

    artifact = savedmodel.export_savedmodel(config, variables, batch_size=4)
    savedmodel.save(artifact, "export/r50/1")   # TF Serving's export/NAME/VERSION/ layout

    loaded = tf.saved_model.load("export/r50/1")
    out = loaded.signatures["serving_default"](images=images, valid_size=valid_size)

The SavedModel holds one ``XlaCallModule`` op, jax2tf's native serialization: TF compiles the
StableHLO of :func:`export.export_predict` (the very program of ``predict.jax``, lowered once
for every platform asked) with its own XLA. The op is built here from that ``Exported`` rather
than by ``jax2tf.convert``, because ``jax2tf.convert`` re-exports and serializes for a 4-week
StableHLO window (1.15.0 with jax 0.10.2), which TensorFlow 2.21 (StableHLO 1.13.7) cannot
deserialize; here the module is written for the StableHLO version of the installed TensorFlow
(or one given). orbax-export builds on ``jax2tf.convert`` and would add a dependency for the
same op.

The weights are ``tf.Variable`` s passed to the op (the SavedModel's ``variables/``, not
constants in the graph): the graph stays small whatever the model size, and the weights are
the exported program's argument, as ``export_predict(weights='argument')`` makes it.
``assets.extra/predict.json`` (TF Serving ignores it) is ``export.save``'s sidecar plus the
format, signature name, StableHLO version and TensorFlow version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

from etils import epath
import jax
from jax import export as jax_export
from jax.extend import mlir as jax_mlir
from jax.extend.mlir.dialects import stablehlo as jax_stablehlo
import ml_collections
import tensorflow as tf
from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
from tensorflow.compiler.tf2xla.python import xla as tfxla

from mrcnn_jax.inference import export
from mrcnn_jax.run import paths as paths_lib

PyTree = Any

FORMAT = "mrcnn_jax.savedmodel/1"
SIGNATURE = "serving_default"
MODEL_FILE = "saved_model.pb"
SIDECAR_PATH = "assets.extra/predict.json"


@dataclasses.dataclass(frozen=True)
class SavedModelArtifact:
  """A ``predict`` SavedModel before it is written.

  Attributes:
    module: the :class:`PredictModule`.
    sidecar: what ``assets.extra/predict.json`` holds.
  """
  module: tf.Module
  sidecar: Dict[str, Any]


def target_stablehlo_version(requested: Optional[str] = None) -> str:
  """The StableHLO version to serialize for: ``requested``, else the older of the installed
  TensorFlow's and jaxlib's (what ``tf.saved_model.load`` here can run).

  Raises:
    ValueError: ``requested`` is not a version this jaxlib can write.
  """
  newest = jax_stablehlo.get_smaller_version(tf_stablehlo.get_current_version(),
                                             jax_stablehlo.get_current_version())
  if requested is None:
    return newest
  oldest = jax_stablehlo.get_minimum_version()
  try:
    ok = (jax_stablehlo.get_smaller_version(requested, oldest) == oldest and
          jax_stablehlo.get_smaller_version(
              requested, jax_stablehlo.get_current_version()) == requested)
  except ValueError:  # not a version string
    ok = False
  if not ok:
    raise ValueError(f"stablehlo_version must be a version from {oldest} to "
                     f"{jax_stablehlo.get_current_version()}, got {requested!r}")
  return requested


def serialize_for(exported: jax_export.Exported, version: str) -> bytes:
  """``exported``'s module as a StableHLO portable artifact of ``version`` (what
  ``XlaCallModule`` of a TensorFlow with that StableHLO version deserializes).

  Raises:
    ValueError: the module uses an op that ``version`` does not have.
  """
  try:
    # Mixed serialization, as jax.export writes it: keeps the Shardy dialect readable.
    return jax_mlir.serialize_portable_artifact(exported.mlir_module(), version, True)
  except Exception as e:  # pylint: disable=broad-except  (MLIR errors come as RuntimeError)
    raise ValueError(f"predict cannot be written for StableHLO {version} "
                     f"({str(e).splitlines()[0]}); pass a newer stablehlo_version") from e


class PredictModule(tf.Module):
  """The weights as ``tf.Variable`` s and ``serve(images, valid_size)``, the program as one
  ``XlaCallModule`` op.

  Args:
    exported: from ``export.export_predict(..., weights='argument')``: called as
      ``(flat_weights, images, valid_size)``.
    module: its StableHLO, serialized for the consuming TensorFlow (:func:`serialize_for`).
    weights: the flat weights ``{'params/...': array}`` in the exported argument's order.

  Attributes:
    exported: the ``Exported`` it runs (not saved: the op holds ``module``).
    params: the weights as variables, in ``weights``' (and the sidecar's ``weight_leaves``)
      order; saved as the SavedModel's ``variables/``.
    serve: the ``tf.function`` saved as the ``serving_default`` signature.
  """

  def __init__(self, exported: jax_export.Exported, module: bytes,
               weights: Mapping[str, Any]):
    super().__init__(name="mrcnn_jax_predict")
    if exported.nr_devices != 1:
      raise ValueError(f"a SavedModel is exported for one device, got {exported.nr_devices}")
    version = exported.calling_convention_version
    if version > tfxla.call_module_maximum_supported_version():
      raise ValueError(f"this TensorFlow's XlaCallModule runs calling convention versions up "
                       f"to {tfxla.call_module_maximum_supported_version()}, predict needs "
                       f"{version}: use a newer TensorFlow")
    self.exported, self._module, self._names = exported, module, list(weights)
    # Frozen weights: trainable=False keeps them out of any gradient tape a loader opens.
    self.params = [tf.Variable(value, trainable=False, name=name)
                   for name, value in weights.items()]
    _, images, valid_size = jax.tree.unflatten(exported.in_tree, exported.in_avals)[0]
    self.serve = tf.function(self._serve, autograph=False, input_signature=[
        tf.TensorSpec(images.shape, tf.as_dtype(images.dtype), name="images"),
        tf.TensorSpec(valid_size.shape, tf.as_dtype(valid_size.dtype), name="valid_size")])

  def _serve(self, images: tf.Tensor, valid_size: tf.Tensor) -> Dict[str, tf.Tensor]:
    """images: [B, H, W, 3] uint8 (or float32 0..255); valid_size: [B, 2] int32 (h, w).
    Returns the exported outputs by name: boxes [B, D, 4], scores [B, D], classes [B, D],
    masks [B, D, 28, 28], valid [B, D] (and image_masks [B, D, H, W])."""
    exp = self.exported
    args = jax.tree.leaves((dict(zip(self._names, self.params)), images, valid_size))
    # jax.export drops arguments the program does not read; the op takes the kept ones.
    args = [a for i, a in enumerate(args) if i in exp.module_kept_var_idx]
    outputs = tfxla.call_module(
        args, version=exp.calling_convention_version, module=self._module,
        Tout=[tf.as_dtype(a.dtype) for a in exp.out_avals],
        Sout=[a.shape for a in exp.out_avals],
        # One op for every platform: XLA picks the module's branch of the device it runs on.
        platforms=[p.upper() for p in exp.platforms], function_list=[],
        has_token_input_output=False,
        disabled_checks=[str(c) for c in exp.disabled_safety_checks],
        # As jax2tf sets it: the module's (absent) shardings were written by this partitioner.
        use_shardy_partitioner=bool(jax.config.jax_use_shardy_partitioner))
    return jax.tree.unflatten(exp.out_tree, outputs)


def export_savedmodel(config: ml_collections.ConfigDict, variables: PyTree, *, batch_size: int,
                      image_size: Optional[Sequence[int]] = None, input_dtype: str = "uint8",
                      compute_dtype: Optional[str] = None,
                      platforms: Sequence[str] = export.PLATFORMS, paste_masks: bool = False,
                      score_threshold: Optional[float] = None,
                      class_names: Optional[Sequence[str]] = None,
                      category_ids: Optional[Sequence[int]] = None,
                      stablehlo_version: Optional[str] = None) -> SavedModelArtifact:
  """``predict`` of ``config.model`` as a SavedModel with a ``serving_default`` signature.

  The arguments but the last are :func:`export.export_predict` 's (the weights are always
  variables); ``stablehlo_version`` is the StableHLO version of the TensorFlow that will serve
  it (default :func:`target_stablehlo_version`: the installed TensorFlow's).

  Returns:
    A :class:`SavedModelArtifact`; :func:`save` writes it. Its signature takes ``images``
    [B, H, W, 3] at ``input_dtype`` and ``valid_size`` [B, 2] int32 and returns the outputs
    ``sidecar['outputs']`` lists.

  Raises:
    ValueError: what ``export_predict`` refuses, a StableHLO version the program cannot be
      written for, or a TensorFlow too old for the calling convention.
  """
  version = target_stablehlo_version(stablehlo_version)
  artifact = export.export_predict(
      config, variables, batch_size=batch_size, image_size=image_size, input_dtype=input_dtype,
      compute_dtype=compute_dtype, platforms=platforms, weights="argument",
      paste_masks=paste_masks, score_threshold=score_threshold, class_names=class_names,
      category_ids=category_ids)
  module = PredictModule(artifact.exported, serialize_for(artifact.exported, version),
                         artifact.weights)
  sidecar = dict(artifact.sidecar)
  sidecar.update({
      "format": FORMAT,
      "artifact": MODEL_FILE,
      "signature": SIGNATURE,
      "stablehlo_version": version,
      "exported_with": {**sidecar["exported_with"], "tensorflow": tf.__version__},
      # Variables of the SavedModel, in the order of the module's ``params``.
      "weights": "variables",
      "weights_file": None,
  })
  return SavedModelArtifact(module, sidecar)


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
  """``ValueError`` if ``out_dir`` already holds a SavedModel and ``overwrite`` is off;
  ``FileNotFoundError`` / ``PermissionError`` if its bucket is missing or refuses access."""
  with paths_lib.one_line_errors("--out", out_dir):
    paths_lib.check_bucket("--out", out_dir)
    exists = (epath.Path(out_dir) / MODEL_FILE).exists()
  if exists and not overwrite:
    raise ValueError(f"{out_dir} already holds {MODEL_FILE}; pick another folder (TF Serving "
                     "reads export/NAME/VERSION/) or pass --overwrite")


def save(artifact: SavedModelArtifact, out_dir: str, *, overwrite: bool = False) -> Dict[str, str]:
  """Writes the SavedModel (``saved_model.pb``, ``variables/``) and ``assets.extra/predict.json``
  into ``out_dir`` (local or ``gs://``).

  Returns:
    ``{'savedmodel', 'sidecar'}``: the paths written.

  Raises:
    ValueError: ``out_dir`` already holds a SavedModel and ``overwrite`` is off.
  """
  check_out_dir(out_dir, overwrite)
  out = epath.Path(out_dir)
  module = artifact.module
  absl_level = logging.getLogger("absl").level
  try:
    tf.saved_model.save(module, str(out), signatures={SIGNATURE: module.serve})
  finally:
    # TensorFlow's save pins absl's logger at WARNING (it restores get_verbosity(), which reads
    # an unset level as WARNING), silencing this process's later logging.info.
    logging.getLogger("absl").setLevel(absl_level)
  sidecar = out / SIDECAR_PATH
  sidecar.parent.mkdir(parents=True, exist_ok=True)
  sidecar.write_text(json.dumps(artifact.sidecar, indent=1))
  return {"savedmodel": str(out), "sidecar": str(sidecar)}


def read_sidecar(directory: str) -> Dict[str, Any]:
  """``assets.extra/predict.json`` of a SavedModel folder written by :func:`save`."""
  return json.loads((epath.Path(directory) / SIDECAR_PATH).read_text())
