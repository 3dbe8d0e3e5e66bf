"""``jax.export`` artifacts of ``MaskRCNN.predict``: one file for CPU, GPU and TPU.

    artifact = export.export_predict(config, variables, batch_size=2, image_size=(512, 512))
    export.save(artifact, "export/r50")   # predict.jax, predict.json, exported.py [, weights.npz]

The exported program is ``MaskRCNN.predict`` (pixel normalisation, network, detection, 28x28
masks), optionally followed by pasting every mask into the static input size
(``ops.masks.paste_masks``), at a fixed batch, input size, input dtype and compute dtype. It is
built with the plain kernels (``modeling.PLAIN``) and lowered for several platforms in one
module; a CPU-only artifact with baked weights is built with the CPU kernels instead (what the
in-process ``predict`` runs there), and the loader compiles it with the same XLA:CPU options.
The weights are either baked in as constants or the program's first argument, a flat dict
``{'params/backbone/stem/conv/kernel': array}`` (saved as ``weights.npz``), so one artifact
serves retrained weights of the same config.

``mrcnn_jax.inference.exported`` (jax and numpy only, copied next to the artifact by
:func:`save`) loads and runs it.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import shutil
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from etils import epath
import jax
from jax import export as jax_export
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

import mrcnn_jax
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.inference import exported as exported_lib
from mrcnn_jax.inference import predictor as predictor_lib
from mrcnn_jax.ops import masks as masks_ops
from mrcnn_jax.run import paths as paths_lib

PyTree = Any

PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
WEIGHT_MODES = ("baked", "argument")
INPUT_DTYPES = ("uint8", "float32")
COMPUTE_DTYPES = ("float32", "bfloat16")
KERNELS = ("auto", "plain", "cpu")
LOADER_FILE = "exported.py"

_OUTPUT_DOCS = {
    "boxes": "xyxy, pixels of the network input",
    "scores": "best first",
    "classes": "1..K (classes[k - 1] of the sidecar)",
    "masks": "probabilities of the predicted class in the box, 28x28",
    "valid": "false for padding rows (all their values are 0)",
    "image_masks": "masks pasted at their boxes into the network input size, probabilities",
}


@dataclasses.dataclass(frozen=True)
class Artifact:
  """An exported ``predict`` before it is written.

  Attributes:
    exported: the ``jax.export.Exported``.
    sidecar: what ``predict.json`` holds.
    weights: the flat weights the program takes (``weights='argument'``), else ``None``.
  """
  exported: jax_export.Exported
  sidecar: Dict[str, Any]
  weights: Optional[Dict[str, np.ndarray]]


def flatten_variables(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """``{'params': {'a': {'kernel': x}}}`` -> ``{'params/a/kernel': x}`` (numpy, sorted keys)."""
  flat = {}

  def walk(prefix, node):
    if isinstance(node, Mapping):
      for key in node:
        walk(f"{prefix}/{key}" if prefix else str(key), node[key])
    else:
      flat[prefix] = np.asarray(node)

  walk("", variables)
  return dict(sorted(flat.items()))


def unflatten_variables(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """Inverse of :func:`flatten_variables` (the leaves stay as they are)."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def save_weights(variables: Mapping[str, Any], path: str) -> str:
  """Writes ``variables`` (nested or already flat) as the ``.npz`` an argument-weights artifact
  takes; returns ``path``."""
  flat = flatten_variables(variables)
  buffer = io.BytesIO()  # zipfile seeks back and reads: a bucket's files are written once
  np.savez(buffer, **flat)
  epath.Path(path).write_bytes(buffer.getvalue())
  return path


def predict_program(model_config: ml_collections.ConfigDict, *, paste_masks: bool = False,
                    kernel_set: modeling.KernelSet = modeling.PLAIN
                    ) -> Callable[..., Dict[str, jax.Array]]:
  """``predict(variables, images, valid_size)``: ``MaskRCNN.predict`` with ``kernel_set``,
  plus ``image_masks`` [B, D, H, W] (each mask pasted into the input size) if ``paste_masks``."""
  if paste_masks and not model_config.mask.get("enabled", True):
    raise ValueError("paste_masks needs the mask branch, but config.model.mask.enabled is False")
  model = modeling.MaskRCNN(model_config, kernels=kernel_set)

  def predict(variables, images, valid_size):
    out = model.apply(variables, images, valid_size, method=modeling.MaskRCNN.predict)
    if paste_masks:
      size = images.shape[1:3]
      aligned = bool(model_config.mask.aligned)
      out["image_masks"] = jax.vmap(
          lambda m, b: masks_ops.paste_masks(m, b, size, aligned=aligned))(
              out["masks"], out["boxes"])
    return out

  return predict


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_platforms(platforms: Sequence[str]) -> Tuple[str, ...]:
  platforms = tuple(platforms)
  if not platforms or len(set(platforms)) != len(platforms):
    raise ValueError(f"platforms must be distinct and at least one, got {platforms}")
  for p in platforms:
    _check_choice("platform", p, KNOWN_PLATFORMS)
  return platforms


def check_options(*, batch_size: int, platforms: Sequence[str]) -> Tuple[str, ...]:
  """``ValueError`` for a batch size below 1 or an unknown or repeated platform (cheap: run it
  before loading a model); returns the platforms as a tuple."""
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return _check_platforms(platforms)


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
  """``ValueError`` if ``out_dir`` already holds an artifact and ``overwrite`` is off;
  ``FileNotFoundError`` / ``PermissionError`` if its bucket is missing or refuses access."""
  with paths_lib.one_line_errors("--out", out_dir):
    paths_lib.check_bucket("--out", out_dir)
    exists = (epath.Path(out_dir) / exported_lib.ARTIFACT_FILE).exists()
  if exists and not overwrite:
    raise ValueError(f"{out_dir} already holds {exported_lib.ARTIFACT_FILE}; pick another "
                     "folder or pass --overwrite")


def _spec(shape: Sequence[int], dtype: Any) -> Dict[str, Any]:
  return {"shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name}


def export_predict(config: ml_collections.ConfigDict, variables: PyTree, *, batch_size: int,
                   image_size: Optional[Sequence[int]] = None, input_dtype: str = "uint8",
                   compute_dtype: Optional[str] = None, platforms: Sequence[str] = PLATFORMS,
                   weights: str = "baked", paste_masks: bool = False,
                   score_threshold: Optional[float] = None,
                   class_names: Optional[Sequence[str]] = None,
                   category_ids: Optional[Sequence[int]] = None,
                   kernel_name: str = "auto") -> Artifact:
  """Exports ``predict`` of ``config.model`` at a static batch and input shape.

  Args:
    config: the experiment config (``model``; ``data.image_size`` is the default input size).
    variables: the model variables (``{'params': ...}`` [+ ``'batch_stats'``]); a CPU
      predictor's precomputed kernel transforms are dropped.
    batch_size: B, static.
    image_size: (H, W), static; default ``config.data.image_size``.
    input_dtype: 'uint8' or 'float32' (0..255) images.
    compute_dtype: activations' dtype ('float32', 'bfloat16'); default the config's.
    platforms: lowered for each of them, in one module ('cpu', 'cuda', 'rocm', 'tpu').
    weights: 'baked' (constants in the program) or 'argument' (the program's first argument:
      a flat dict keyed as :func:`flatten_variables` keys them).
    paste_masks: add ``image_masks`` [B, D, H, W] float32: each mask pasted at its box into
      the input size, as ``ops.masks.paste_masks`` (torchvision's paste).
    score_threshold: detections below it are dropped in the program (the detector's
      ``roi.score_threshold``); default the config's.
    class_names, category_ids: of classes 1..K for the sidecar; default ``class_k`` and 1..K.
    kernel_name: 'auto', 'plain' or 'cpu' (:func:`resolve_kernels`): a CPU-only artifact
      with baked weights runs the CPU kernels, as the in-process predict does on a CPU.

  Returns:
    An :class:`Artifact`; :func:`save` writes it.

  Raises:
    ValueError: a bad batch size, input size, dtype, platform or weights mode, or a platform
      the program does not lower for (named, so it can be left out).
  """
  platforms = check_options(batch_size=batch_size, platforms=platforms)
  image_size = tuple(int(v) for v in (image_size or config.data.image_size))
  if len(image_size) != 2 or min(image_size) < 1:
    raise ValueError(f"image_size must be (H, W) > 0, got {image_size}")
  _check_choice("input_dtype", input_dtype, INPUT_DTYPES)
  _check_choice("weights", weights, WEIGHT_MODES)
  model_config = config.model.copy_and_resolve_references()
  if compute_dtype is not None:
    _check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    model_config.compute_dtype = compute_dtype
  if score_threshold is not None:
    model_config.roi.score_threshold = float(score_threshold)
  num_fg = int(model_config.num_classes) - 1
  class_names = list(class_names or [f"class_{k}" for k in range(1, num_fg + 1)])
  category_ids = list(category_ids or range(1, num_fg + 1))
  if len(class_names) != num_fg or len(category_ids) != num_fg:
    raise ValueError(f"need {num_fg} class names and category ids (num_classes - 1), got "
                     f"{len(class_names)} and {len(category_ids)}")

  kernel_name = resolve_kernels(kernel_name, platforms, weights)
  kernel_set = kernels.select(kernel_name)
  program = predict_program(model_config, paste_masks=paste_masks, kernel_set=kernel_set)
  # PLAIN keeps no precomputed collection (this drops a CPU predictor's Winograd transforms);
  # the CPU set bakes its transformed kernels in.
  plain = kernels.prepare_inference(modeling.MaskRCNN(model_config, kernels=kernel_set),
                                    dict(variables), image_size, int(batch_size))
  b = int(batch_size)
  images = jax.ShapeDtypeStruct((b,) + image_size + (3,), jnp.dtype(input_dtype))
  valid_size = jax.ShapeDtypeStruct((b, 2), jnp.int32)
  flat = flatten_variables(plain)
  if weights == "baked":
    constants = jax.tree.map(jnp.asarray, plain)
    fn, args = jax.jit(lambda im, vs: program(constants, im, vs)), (images, valid_size)
  else:
    fn = jax.jit(lambda w, im, vs: program(unflatten_variables(w), im, vs))
    args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}, images,
            valid_size)
  try:
    exp = jax_export.export(fn, platforms=platforms)(*args)
  except Exception as e:  # pylint: disable=broad-except  (lowering errors come in many types)
    failing = [p for p in platforms if len(platforms) > 1 and not _lowers(fn, p, args)]
    if not failing or len(failing) == len(platforms):
      raise  # not a platform's doing
    raise ValueError(f"predict does not lower for {', '.join(failing)} "
                     f"({str(e).splitlines()[0]}); leave it out of the platforms") from e

  outputs = jax.tree.unflatten(exp.out_tree, exp.out_avals)
  sidecar = {
      "format": exported_lib.FORMAT,
      "function": "mrcnn_jax.modeling.MaskRCNN.predict" + (" + paste_masks" if paste_masks
                                                         else ""),
      "artifact": exported_lib.ARTIFACT_FILE,
      "exported_with": {"mrcnn_jax": mrcnn_jax.__version__, "jax": jax.__version__,
                        "jaxlib": jaxlib.__version__,
                        "calling_convention_version": exp.calling_convention_version},
      # jax.export: loadable by a jaxlib up to 6 months newer, 3 weeks older than this one.
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platforms": list(exp.platforms),
      "kernels": kernel_name,
      # The CPU kernels' compiler options (kernels.compiler_options), as the in-process
      # predict compiles them; the loader applies them when its XLA accepts them.
      "compiler_options": ({"cpu": kernels.compiler_options("cpu")} if kernel_name == "cpu"
                           else {}),
      "batch_size": b,
      "image_size": list(image_size),
      "input_dtype": input_dtype,
      "compute_dtype": str(model_config.compute_dtype),
      "paste_masks": bool(paste_masks),
      "weights": weights,
      "weights_file": exported_lib.WEIGHTS_FILE if weights == "argument" else None,
      "weight_leaves": ([{"name": k, **_spec(v.shape, v.dtype)} for k, v in flat.items()]
                        if weights == "argument" else []),
      "inputs": [
          {"name": "images", **_spec(images.shape, images.dtype),
           "doc": "RGB, 0..255, each image zero-padded at bottom/right"},
          {"name": "valid_size", **_spec(valid_size.shape, valid_size.dtype),
           "doc": "(h, w) of each image before padding"},
      ],
      "outputs": [{"name": k, **_spec(v.shape, v.dtype), "doc": _OUTPUT_DOCS.get(k, "")}
                  for k, v in outputs.items()],
      "classes": [{"index": k + 1, "name": str(n), "category_id": int(c)}
                  for k, (n, c) in enumerate(zip(class_names, category_ids))],
      "score_threshold": float(model_config.roi.score_threshold),
      "model": json.loads(model_config.to_json()),
  }
  return Artifact(exp, sidecar, flat if weights == "argument" else None)


def resolve_kernels(name: str, platforms: Sequence[str], weights: str) -> str:
  """'plain' or 'cpu' for ``kernel_name`` ('auto', 'plain', 'cpu'): 'auto' picks the CPU
  kernels (Winograd, matmul forms: faster on XLA:CPU) for a CPU-only artifact with baked
  weights, else the plain ones (what GPUs and TPUs run; weights as an argument stay the
  model's own parameters, not their CPU transforms)."""
  _check_choice("kernels", name, KERNELS)
  cpu_only = tuple(platforms) == ("cpu",)
  if name == "auto":
    return "cpu" if cpu_only and weights == "baked" else "plain"
  if name == "cpu" and not (cpu_only and weights == "baked"):
    raise ValueError("kernels='cpu' needs platforms=('cpu',) and baked weights (its programs "
                     "are XLA:CPU's, its weights transformed)")
  return name


def _lowers(fn: Callable, platform: str, args: Sequence[Any]) -> bool:
  try:
    jax_export.export(fn, platforms=(platform,))(*args)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def save(artifact: Artifact, out_dir: str, *, overwrite: bool = False) -> Dict[str, str]:
  """Writes ``predict.jax``, ``predict.json``, the loader ``exported.py`` and, for argument
  weights, ``weights.npz`` into ``out_dir`` (local or ``gs://``).

  Returns:
    ``{'artifact', 'sidecar', 'loader'[, 'weights']}``: the paths written.

  Raises:
    ValueError: ``out_dir`` already holds an artifact and ``overwrite`` is off.
  """
  check_out_dir(out_dir, overwrite)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"artifact": out / exported_lib.ARTIFACT_FILE,
           "sidecar": out / exported_lib.SIDECAR_FILE, "loader": out / LOADER_FILE}
  paths["artifact"].write_bytes(bytes(artifact.exported.serialize()))
  paths["sidecar"].write_text(json.dumps(artifact.sidecar, indent=1))
  # The loader travels with the artifact: a serving host needs no mrcnn_jax install.
  with epath.Path(exported_lib.__file__).open("rb") as src, paths["loader"].open("wb") as dst:
    shutil.copyfileobj(src, dst)
  if artifact.weights is not None:
    paths["weights"] = out / exported_lib.WEIGHTS_FILE
    save_weights(artifact.weights, str(paths["weights"]))
  return {k: str(v) for k, v in paths.items()}


def random_variables(config: ml_collections.ConfigDict, seed: int = 0) -> PyTree:
  """Random variables of ``config.model`` (for trying an export without a checkpoint), drawn
  with the fast ``unsafe_rbg`` key (``kernels.init_key``) under ``jax.jit``."""
  model = modeling.MaskRCNN(config.model, kernels=dataclasses.replace(
      modeling.PLAIN, init_key=kernels.init_key))
  size = tuple(int(v) for v in config.data.image_size)
  return jax.jit(lambda k: modeling.init_variables(model, k, size))(jax.random.PRNGKey(seed))


def load_checkpoint(config: ml_collections.ConfigDict, path: str) -> Tuple[PyTree, list, list]:
  """``(variables, class_names, category_ids)`` of a workdir, checkpoint or weights file,
  loaded as ``inference.Predictor.from_workdir`` (and so ``scripts/predict.py``) loads them."""
  plain = config.copy_and_resolve_references()
  plain.kernels = "plain"  # nothing CPU-specific is precomputed for a portable program
  predictor = predictor_lib.Predictor.from_workdir(plain, path)
  return predictor.variables, predictor.class_names, predictor.category_ids
