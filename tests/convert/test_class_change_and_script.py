"""Fine-tuning with another class count, and the ``scripts/convert_weights.py`` round trip."""

from __future__ import annotations

import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch

from mrcnn_jax import convert
from mrcnn_jax.convert import common
from mrcnn_jax.run import checkpoint as ckpt_lib
from tests.convert import torch_models as tm

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


@pytest.fixture(scope="module")
def small_state():
  model = tm.small_maskrcnn(seed=3, num_classes=6)
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_class_count_change_keeps_trunk_and_reinitialises_class_layers(small_state, caplog):
  full, config6 = convert.convert_torchvision_maskrcnn(small_state)
  assert config6.num_classes == 6
  with caplog.at_level("INFO"):
    ft, config3 = convert.convert_torchvision_maskrcnn(small_state, num_classes=3,
                                                       key=jax.random.key(7))
  assert config3.num_classes == 3
  for name in ("box_predictor/cls_score", "box_predictor/bbox_pred",
               "mask_predictor/mask_fcn_logits"):
    assert name in caplog.text
  a, b = _flat(ft), _flat(full)
  assert set(a) == set(b)
  changed = {k for k in a if k.startswith(("params/box_predictor/",
                                           "params/mask_predictor/mask_fcn_logits/"))}
  assert len(changed) == 6
  for k in a:
    if k in changed:
      assert a[k].shape[-1] in (3, 12), (k, a[k].shape)
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Fresh layers come from the model's initialisers: non-trivial weights (zero conv biases).
  assert np.std(a["params/box_predictor/cls_score/kernel"]) > 0
  # The result runs in the model (shapes are the 3-class model's).
  common.check_against_expected({tuple(k.split("/")): v for k, v in a.items()},
                                common.expected_variables(config3),
                                common.SourceWeights({}, "test"))


def test_wrong_config_shape_mismatch_is_named(small_state):
  config = convert.torchvision_maskrcnn_config(small_state)
  config.roi.representation_size = 32
  with pytest.raises(convert.ConversionError, match=r"box_head/fc6/kernel"):
    convert.convert_torchvision_maskrcnn(small_state, config=config)


def test_legacy_key_names_are_accepted(small_state):
  legacy = {}
  for k, v in small_state.items():
    k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    for i in range(2):
      k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
    for kind in ("inner", "layer"):
      for i in range(4):
        k = k.replace(f"backbone.fpn.{kind}_blocks.{i}.0.", f"backbone.fpn.{kind}_blocks.{i}.")
    legacy[k] = v
  assert "rpn.head.conv.weight" in legacy
  a, _ = convert.convert_torchvision_maskrcnn(legacy)
  b, _ = convert.convert_torchvision_maskrcnn(small_state)
  for k, v in _flat(b).items():
    np.testing.assert_array_equal(_flat(a)[k], v)


def test_v1_and_v2_state_dicts_are_told_apart(small_state):
  with pytest.raises(convert.ConversionError, match="v1"):
    convert.convert_torchvision_maskrcnn_v2(small_state)
  with pytest.raises(convert.ConversionError, match="v2"):
    convert.convert_torchvision_maskrcnn({"rpn.head.conv.1.0.weight": np.zeros(1)})


def _run_script(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(_REPO, "scripts", "convert_weights.py"),
                         *args], capture_output=True, text=True, env=env, cwd=_REPO, timeout=600)


def test_script_writes_a_checkpoint_the_trainer_reads(tmp_path, small_state):
  pth = tmp_path / "model.pth"
  torch.save({k: torch.from_numpy(v) for k, v in small_state.items()}, pth)
  out = tmp_path / "converted"
  proc = _run_script("--source", "torchvision", "--input", str(pth), "--output", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / common.CONFIG_FILE).exists() and (out / "checkpoints" / "0").is_dir()
  variables, config = convert.load_converted(str(out))
  ref, ref_config = convert.convert_torchvision_maskrcnn(small_state)
  assert config.to_dict() == ref_config.to_dict()
  flat, ref_flat = _flat(variables), _flat(ref)
  assert set(flat) == set(ref_flat)
  for k, v in ref_flat.items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  # config.init_weights reads it through the trainer's loader.
  loaded = ckpt_lib.load_params(str(out))
  np.testing.assert_array_equal(loaded["backbone/conv1/kernel"],
                                ref_flat["params/backbone/conv1/kernel"])
  assert len(loaded) == sum(1 for k in ref_flat if k.startswith("params/"))


def test_script_v2_source_fails_clearly_on_a_v1_file(tmp_path, small_state):
  pth = tmp_path / "v1.pth"
  torch.save({k: torch.from_numpy(v) for k, v in small_state.items()}, pth)
  proc = _run_script("--source", "torchvision-v2", "--input", str(pth), "--output",
                     str(tmp_path / "o"))
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--source torchvision)" in errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def test_script_missing_input_and_stray_arguments_are_one_line(tmp_path):
  proc = _run_script("--source", "torchvision", "--input", str(tmp_path / "nope.pth"),
                     "--output", str(tmp_path / "o"))
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert [l for l in proc.stderr.splitlines() if l.startswith("error:")], proc.stderr[-3000:]
  proc = _run_script("--source", "torchvision", "--input", "a.pth", "--output", "o", "extra")
  assert proc.returncode != 0 and "unexpected arguments: extra" in proc.stderr
