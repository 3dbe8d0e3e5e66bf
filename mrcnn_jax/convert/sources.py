"""One entry point over every supported weight source, used by ``scripts/convert_weights.py``.

``convert_file(source, path, num_classes=None)`` reads the file with the right reader (torch
only for ``.pth`` sources, imported on use) and returns ``(variables, model config)``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import ml_collections

from mrcnn_jax.convert import detectron2
from mrcnn_jax.convert import torchvision

SOURCES = ("torchvision", "torchvision-v2", "torchvision-keypoint", "detectron2",
           "torchvision-resnet")


def convert_file(source: str, path: str, *, num_classes: Optional[int] = None,
                 input_format: str = "BGR", stride_in_1x1: bool = True
                 ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """Converts the weight file ``path`` of kind ``source`` (one of :data:`SOURCES`).

  Args:
    source: 'torchvision' (maskrcnn_resnet50_fpn v1 ``.pth``), 'torchvision-v2'
      (maskrcnn_resnet50_fpn_v2 ``.pth``), 'torchvision-keypoint' (keypointrcnn_resnet50_fpn
      ``.pth``: boxes and keypoints, no masks), 'detectron2' (model-zoo ``.pkl``) or
      'torchvision-resnet' (ImageNet resnet50/101 ``.pth``: backbone only).
    num_classes: classes including background, for fine-tuning with another label set.
    input_format, stride_in_1x1: Detectron2 only, see ``convert_detectron2``.
  """
  if source == "torchvision":
    out = torchvision.convert_torchvision_maskrcnn(torchvision.load_torch_state_dict(path),
                                                   num_classes=num_classes)
  elif source == "torchvision-v2":
    out = torchvision.convert_torchvision_maskrcnn_v2(torchvision.load_torch_state_dict(path),
                                                      num_classes=num_classes)
  elif source == "torchvision-keypoint":
    out = torchvision.convert_torchvision_keypointrcnn(torchvision.load_torch_state_dict(path),
                                                       num_classes=num_classes)
  elif source == "detectron2":
    out = detectron2.convert_detectron2(detectron2.load_detectron2_pkl(path),
                                        num_classes=num_classes, input_format=input_format,
                                        stride_in_1x1=stride_in_1x1)
  elif source == "torchvision-resnet":
    if num_classes is not None:
      logging.info("torchvision-resnet: num_classes only sets the config; heads are the "
                   "trainer's to initialise")
    variables, config = torchvision.convert_torchvision_resnet(
        torchvision.load_torch_state_dict(path))
    if num_classes is not None:
      config.num_classes = int(num_classes)
    out = variables, config
  else:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  torchvision.log_summary(out[0], f"{source} {path}")
  return out
