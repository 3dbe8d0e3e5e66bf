"""Shared machinery of the weight importers: layout transforms, strict key accounting, the
expected variable tree of a config, class-count changes, and the checkpoint writer.

A converter is a table from *our* leaf paths (``('params', 'backbone', 'conv1', 'kernel')``) to
a source key and a transform. :class:`SourceWeights` hands out source arrays and remembers which
were used, so that at the end every source key the table did not consume is reported by name
(never silently dropped), as is every expected leaf the source lacks and every shape that
differs (:func:`check_against_expected`). Torch is never imported here.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mrcnn_jax import modeling
from mrcnn_jax.modeling.config import upgrade_model_config
from mrcnn_jax.modeling import roi_heads
from mrcnn_jax.run import paths
from mrcnn_jax.run.checkpoint import CHECKPOINT_DIR

Path = Tuple[str, ...]
Flat = Dict[Path, np.ndarray]

# Leaves whose shape depends on ``config.num_classes``: re-initialised when the class count
# changes (fine-tuning on another label set).
CLASS_DEPENDENT = (
    ("params", "box_predictor", "cls_score"),
    ("params", "box_predictor", "bbox_pred"),
    ("params", "mask_predictor", "mask_fcn_logits"),
)

# Our norm leaf -> torch buffer/parameter suffix.
NORM_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


class ConversionError(ValueError):
  """Source weights do not fit the model: names the missing, unexpected and misshapen keys."""


# ---------------------------------------------------------------------------- array layouts


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I, kh, kw] -> Flax HWIO [kh, kw, I, O]."""
  _check_rank("conv weight", w, 4)
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def deconv_kernel(w: np.ndarray) -> np.ndarray:
  """torch ConvTranspose2d weight [I, O, kh, kw] -> Flax ``ConvTranspose`` kernel [kh, kw, I, O].

  Flax's ``ConvTranspose`` (``transpose_kernel=False``) correlates the stride-dilated input with
  its kernel, whereas torch scatters each input pixel through the kernel: the two agree once the
  spatial axes are reversed.
  """
  _check_rank("conv-transpose weight", w, 4)
  return np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1))[::-1, ::-1])


def dense_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  _check_rank("linear weight", w, 2)
  return np.ascontiguousarray(w.T)


def flatten_chw_dense_kernel(w: np.ndarray, pooled: int) -> np.ndarray:
  """A Linear layer over torch's CHW-flattened RoI features -> a Dense over our HWC flattening.

  Args:
    w: [out, C * pooled * pooled] torch weight (input index ``c * p * p + y * p + x``).
    pooled: the RoI feature side ``p`` (7).

  Returns:
    [pooled * pooled * C, out] kernel (input index ``(y * p + x) * C + c``).
  """
  _check_rank("linear weight", w, 2)
  out, fan_in = w.shape
  if fan_in % (pooled * pooled):
    raise ConversionError(f"linear weight {w.shape}: input size {fan_in} is not C * {pooled}**2")
  c = fan_in // (pooled * pooled)
  w = w.reshape(out, c, pooled, pooled).transpose(2, 3, 1, 0)
  return np.ascontiguousarray(w.reshape(pooled * pooled * c, out))


def _check_rank(what: str, w: np.ndarray, rank: int) -> None:
  if w.ndim != rank:
    raise ConversionError(f"{what} must have rank {rank}, got shape {w.shape}")


# ---------------------------------------------------------------------------- key accounting


def to_numpy_dict(state: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """A state dict of torch tensors / numpy arrays -> ``{name: float32/int numpy array}``."""
  out = {}
  for k, v in state.items():
    if hasattr(v, "detach"):  # a torch tensor; no torch import needed to read it
      v = v.detach().cpu().numpy()
    v = np.asarray(v)
    out[k] = v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
  return out


class SourceWeights:
  """Source arrays by name, recording which names a converter used and which it lacked."""

  def __init__(self, arrays: Mapping[str, np.ndarray], source: str):
    self.arrays = dict(arrays)
    self.source = source
    self.used: set = set()
    self.missing: list = []

  def take(self, name: str) -> Optional[np.ndarray]:
    """The array called ``name`` (marked used), or None (recorded as missing)."""
    if name not in self.arrays:
      self.missing.append(name)
      return None
    self.used.add(name)
    return self.arrays[name]

  def ignore(self, patterns: Iterable[str], why: str) -> None:
    """Marks keys matching any regex in ``patterns`` as known non-parameters, with a log line."""
    regexes = [re.compile(p) for p in patterns]
    dropped = sorted(k for k in self.arrays
                     if k not in self.used and any(r.fullmatch(k) for r in regexes))
    self.used.update(dropped)
    if dropped:
      logging.info("%s: ignoring %d %s keys, e.g. %s", self.source, len(dropped), why,
                   dropped[:3])

  def unused(self) -> list:
    return sorted(k for k in self.arrays if k not in self.used)


def expected_variables(config: ml_collections.ConfigDict) -> Flat:
  """Our model's variable shapes for ``config``: ``{path: ShapeDtypeStruct}`` (no compute)."""
  model = modeling.MaskRCNN(config)
  shapes = jax.eval_shape(lambda k: modeling.init_variables(model, k, (64, 64)),
                          jax.random.key(0))
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))


def check_against_expected(converted: Flat, expected: Flat, src: SourceWeights) -> None:
  """Raises :class:`ConversionError` naming every problem at once.

  Problems: source keys that were never used (unknown to the converter), source keys the
  converter needed but the file lacks, our leaves with no converted value, and shape mismatches.
  """
  problems = []
  unused = src.unused()
  if src.missing:
    problems.append(f"missing in {src.source}: {sorted(set(src.missing))}")
  if unused:
    problems.append(f"unexpected keys in {src.source}: {unused}")
  absent = sorted("/".join(p) for p in expected if p not in converted)
  extra = sorted("/".join(p) for p in converted if p not in expected)
  if absent and not src.missing:
    problems.append(f"model leaves without a value: {absent}")
  if extra:
    problems.append(f"converted leaves the model does not have: {extra}")
  shapes = [f"{'/'.join(p)}: converted {tuple(v.shape)} vs model {tuple(expected[p].shape)}"
            for p, v in converted.items() if p in expected
            and tuple(v.shape) != tuple(expected[p].shape)]
  if shapes:
    problems.append("shape mismatches: " + "; ".join(sorted(shapes)))
  if problems:
    raise ConversionError("cannot convert " + src.source + ":\n  " + "\n  ".join(problems))


def unflatten(flat: Flat) -> Dict[str, Any]:
  """``{path: array}`` -> nested dicts of float32 ``jnp`` arrays."""
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


# ---------------------------------------------------------------------------- class count


def reinit_class_layers(flat: Flat, config: ml_collections.ConfigDict, key: jax.Array,
                        source_classes: int) -> Flat:
  """Replaces the class-dependent leaves with fresh ones for ``config.num_classes``.

  Backbone, FPN, RPN, the box head's MLP, the mask head's convs and its deconv are kept; the
  class logits, class-specific box deltas and per-class mask logits are drawn from the model's
  own initialisers (the same the trainer would use).
  """
  k_box, k_mask = jax.random.split(key)
  rep = config.roi.representation_size
  box = roi_heads.FastRCNNPredictor(config.num_classes).init(k_box, jnp.zeros((1, rep)))
  c = config.mask.conv_channels[-1]
  mask = roi_heads.MaskRCNNPredictor(config.num_classes).init(k_mask, jnp.zeros((1, 14, 14, c)))
  fresh = {("params", "box_predictor") + p[1:]: v for p, v in
           flax.traverse_util.flatten_dict(flax.core.unfreeze(box)).items()}
  fresh.update({("params", "mask_predictor") + p[1:]: v for p, v in
                flax.traverse_util.flatten_dict(flax.core.unfreeze(mask)).items()
                if p[1] == "mask_fcn_logits"})
  out = {p: v for p, v in flat.items() if p[:3] not in CLASS_DEPENDENT}
  out.update({p: np.asarray(v) for p, v in fresh.items()})
  logging.info("num_classes %d -> %d: re-initialised the class-dependent layers %s; kept "
               "backbone, fpn, rpn_head, box_head, mask_head and mask_predictor/conv5_mask",
               source_classes, config.num_classes,
               ", ".join("/".join(p[1:]) for p in CLASS_DEPENDENT))
  return out


# ---------------------------------------------------------------------------- checkpoints

CONFIG_FILE = "model_config.json"
EXPERIMENT_FILE = "config.py"  # an experiment config for --config of the scripts

# Written next to the checkpoint so that `predict.py --config OUTPUT/config.py[:H,W]
# --checkpoint OUTPUT` runs the converted model with the converted model config.
_EXPERIMENT_TEMPLATE = '''"""Experiment config of the converted weights in this folder (written by convert_weights.py).

  python scripts/predict.py --config {dir}/config.py:1344,1344 --checkpoint {dir} \\
      --config.data.min_size=800 --config.data.max_size=1333 \\
      --images 'photos/*.jpg' --out predictions/

The optional argument ``H,W`` is ``config.data.image_size`` (default 1024,1024): every image is
scaled to fit it and zero-padded, or with ``config.data.min_size`` / ``max_size`` (800 / 1333 as
torchvision and Detectron2) scaled by its shorter side and padded to it; see
``mrcnn_jax.convert.common.experiment_config``.
"""

import os

from mrcnn_jax.convert import common


def get_config(arg=None):
  return common.experiment_config(os.path.dirname(os.path.abspath(__file__)), arg)
'''

# The same for an output folder in a bucket: scripts load --config from a local file, so this
# one names its folder instead of its own location and works wherever it is copied to.
_URL_EXPERIMENT_TEMPLATE = '''"""Experiment config of converted weights (written by convert_weights.py): {dir}.

``--config`` reads a local file: copy this one anywhere (it reads the model config and the
weights from {dir}), then

  python scripts/predict.py --config converted_config.py:1344,1344 --checkpoint {dir} \\
      --config.data.min_size=800 --config.data.max_size=1333 \\
      --images 'photos/*.jpg' --out predictions/

The optional argument ``H,W`` is ``config.data.image_size`` (default 1024,1024); see
``mrcnn_jax.convert.common.experiment_config``.
"""

from mrcnn_jax.convert import common


def get_config(arg=None):
  return common.experiment_config({dir!r}, arg)
'''


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of :func:`config_to_json`, upgraded to the current fields (JSON lists become
  tuples)."""
  return upgrade_model_config(json.loads(text))


def save_converted(variables: Mapping[str, Any], config: ml_collections.ConfigDict,
                   output_dir: str) -> str:
  """Writes ``output_dir/checkpoints/0`` (orbax) and ``output_dir/model_config.json``.

  The checkpoint has the items of the trainer's checkpoints (``state`` holding ``params`` and,
  for trainable BatchNorm, ``batch_stats``; ``meta`` with the model config), so
  ``config.init_weights=output_dir`` and the evaluation/prediction scripts read it as they read
  a training checkpoint's parameters.

  Returns:
    the checkpoint step directory.
  """
  output_dir = paths.check_writable_dir("output folder", output_dir)
  state = {k: jax.tree.map(np.asarray, flax.core.unfreeze(v)) for k, v in variables.items()}
  meta = {"step": 0, "data_position": 0, "model_config": json.loads(config_to_json(config))}
  with paths.one_line_errors("output folder", output_dir):
    manager = ocp.CheckpointManager(paths.join(output_dir, CHECKPOINT_DIR),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    manager.close()
    epath.Path(paths.join(output_dir, CONFIG_FILE)).write_text(config_to_json(config))
    template = _URL_EXPERIMENT_TEMPLATE if paths.is_url(output_dir) else _EXPERIMENT_TEMPLATE
    epath.Path(paths.join(output_dir, EXPERIMENT_FILE)).write_text(
        template.format(dir=output_dir))
  return paths.join(output_dir, CHECKPOINT_DIR, "0")


def experiment_config(output_dir: str, image_size: Optional[str] = None
                      ) -> ml_collections.ConfigDict:
  """The base experiment config with ``model`` = the converted model config of ``output_dir``.

  Args:
    output_dir: a :func:`save_converted` folder.
    image_size: ``"H,W"``, the static network input (``config.data.image_size``); each image
      is scaled to fit it and zero-padded. torchvision and Detectron2 instead resize the
      shorter side to 800 (longer <= 1333) and pad to a multiple of 32: set
      ``config.data.min_size`` / ``max_size`` to 800 / 1333 (with ``1344,1344``) for their
      sizes; ``inference.Predictor`` then resizes as torchvision does (its size rule and its
      float bilinear resample), so the model sees torchvision's pixels.
      A converted torchvision config places its anchors by torchvision's rule at any size
      (``anchors.strides_from_grid``); Detectron2's equal ours at multiples of 64.
  """
  # Here, not at the top: the base config pulls in the training package, which converting
  # weights does not need.
  from mrcnn_jax.config import get_base_config  # pylint: disable=g-import-not-at-top

  output_dir = paths.resolve(output_dir)
  model = config_from_json(_read_config_file(output_dir))
  config = get_base_config()
  config.model = model
  config.init_weights = output_dir
  if image_size:
    try:
      h, w = (int(v) for v in str(image_size).split(","))
    except ValueError:
      raise ValueError(f"image size must be 'H,W', got {image_size!r}") from None
    config.data.image_size = (h, w)
  return config


def load_converted(output_dir: str) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """Reads what :func:`save_converted` wrote (local or ``gs://``): ``(variables, model
  config)``."""
  output_dir = paths.resolve(output_dir)
  config = config_from_json(_read_config_file(output_dir))
  with paths.one_line_errors("converted weights", output_dir):
    manager = ocp.CheckpointManager(paths.join(output_dir, CHECKPOINT_DIR))
    restored = manager.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
  return dict(restored.state), config


def _read_config_file(output_dir: str) -> str:
  """``output_dir/model_config.json``; a missing folder, bucket or file is one line."""
  path = paths.join(output_dir, CONFIG_FILE)
  paths.check_exists("converted model config", path)
  with paths.one_line_errors("converted model config", path):
    return epath.Path(path).read_text()


def apply_table(table: Sequence[Tuple[Path, str, Callable[[np.ndarray], np.ndarray]]],
                src: SourceWeights) -> Flat:
  """Runs ``(our path, source key, transform)`` rows; missing keys are recorded, not raised."""
  out = {}
  for path, name, fn in table:
    w = src.take(name)
    if w is not None:
      out[path] = np.asarray(fn(w), np.float32)
  return out


def convert_table(src: SourceWeights, config: ml_collections.ConfigDict, expected: Flat,
                  table_fn: Callable[[Flat], Sequence[Tuple[Path, str, Callable]]],
                  class_patterns: Sequence[str], key: Optional[jax.Array]) -> Dict[str, Any]:
  """The shared end of every Mask R-CNN converter: fill ``expected`` from ``src``.

  When the source's class count (``roi_heads.box_predictor.cls_score.weight``) differs from
  ``config.num_classes``, the source keys matching ``class_patterns`` are ignored (logged) and
  the class-dependent layers re-initialised with ``key`` (default ``jax.random.key(0)``).

  Args:
    src: the source weights (unknown keys are reported by name at the end).
    config: the model config converted into; expected: its flat variables (shapes).
    table_fn: ``expected -> [(our path, source name, transform)]``.
    class_patterns: regexes of the source's class-dependent keys.
    key: PRNG key for re-initialised layers.

  Returns:
    The nested variables, checked against ``expected``.
  """
  logits = src.arrays.get("roi_heads.box_predictor.cls_score.weight")
  source_classes = config.num_classes if logits is None else int(logits.shape[0])
  reinit = source_classes != config.num_classes
  rows = table_fn(expected)
  if reinit:
    src.ignore(list(class_patterns), f"class-dependent ({source_classes} classes)")
    rows = [r for r in rows if r[0][:3] not in CLASS_DEPENDENT]
  flat = apply_table(rows, src)
  if reinit:
    flat = reinit_class_layers(flat, config, jax.random.key(0) if key is None else key,
                               source_classes)
  check_against_expected(flat, expected, src)
  return unflatten(flat)

