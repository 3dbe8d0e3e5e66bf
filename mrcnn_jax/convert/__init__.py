"""mrcnn_jax.convert: import torchvision and Detectron2 weights as our Flax variables + config.

    from mrcnn_jax import convert
    state = convert.load_torch_state_dict("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    variables, config = convert.convert_torchvision_maskrcnn(state)
    convert.save_converted(variables, config, "/tmp/maskrcnn_tv")

Torch is imported only when a ``.pth`` file is read; Detectron2 ``.pkl`` files need no torch.
"""

from mrcnn_jax.convert.common import ConversionError
from mrcnn_jax.convert.common import load_converted
from mrcnn_jax.convert.common import save_converted
from mrcnn_jax.convert.detectron2 import convert_detectron2
from mrcnn_jax.convert.detectron2 import detectron2_config
from mrcnn_jax.convert.detectron2 import load_detectron2_pkl
from mrcnn_jax.convert.sources import convert_file
from mrcnn_jax.convert.sources import SOURCES
from mrcnn_jax.convert.torchvision import convert_torchvision_keypointrcnn
from mrcnn_jax.convert.torchvision import convert_torchvision_maskrcnn
from mrcnn_jax.convert.torchvision import convert_torchvision_maskrcnn_v2
from mrcnn_jax.convert.torchvision import convert_torchvision_resnet
from mrcnn_jax.convert.torchvision import load_torch_state_dict
from mrcnn_jax.convert.torchvision import torchvision_keypointrcnn_config
from mrcnn_jax.convert.torchvision import torchvision_maskrcnn_config
from mrcnn_jax.convert.torchvision import torchvision_maskrcnn_v2_config

__all__ = [
    "ConversionError",
    "SOURCES",
    "convert_detectron2",
    "convert_file",
    "convert_torchvision_keypointrcnn",
    "convert_torchvision_maskrcnn",
    "convert_torchvision_maskrcnn_v2",
    "convert_torchvision_resnet",
    "detectron2_config",
    "load_converted",
    "load_detectron2_pkl",
    "load_torch_state_dict",
    "save_converted",
    "torchvision_keypointrcnn_config",
    "torchvision_maskrcnn_config",
    "torchvision_maskrcnn_v2_config",
]
