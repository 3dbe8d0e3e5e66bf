"""modeling.config: the defaults live here, and old saved configs are upgraded in one place."""

from __future__ import annotations

import json

from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.modeling.config import upgrade_model_config


def test_upgrade_fills_fields_an_old_config_lacks_with_todays_defaults():
  saved = json.loads(model_config().to_json_best_effort())
  del saved["rpn"]["head_convs"], saved["mask"]["norm"], saved["anchors"]["round"]
  saved["num_classes"] = 5
  upgraded = upgrade_model_config(saved)
  assert upgraded.rpn.head_convs == 1 and upgraded.mask.norm == "none"
  assert upgraded.anchors.round is True
  assert upgraded.num_classes == 5


def test_upgrade_round_trips_the_current_config_with_tuples():
  config = model_config()
  config.backbone.stage_blocks = (1, 2, 3, 4)
  upgraded = upgrade_model_config(json.loads(config.to_json_best_effort()))
  assert upgraded.to_dict() == config.to_dict()
  assert upgraded.anchors.sizes == ((32,), (64,), (128,), (256,), (512,))
  assert isinstance(upgraded.backbone.stage_blocks, tuple)


def test_upgrade_keeps_fields_the_defaults_do_not_have():
  saved = {"roi": {"no_such_field": 3}}
  assert upgrade_model_config(saved).roi.no_such_field == 3
