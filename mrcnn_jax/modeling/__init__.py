"""mrcnn_jax.modeling: the Mask R-CNN network (and its keypoint branch), losses and configs.

    from mrcnn_jax import modeling
    model = modeling.MaskRCNN(modeling.model_config())   # plain Flax / lax layers
    variables = modeling.init_variables(model, jax.random.key(0), (512, 512))
    out = model.apply(variables, images, method=modeling.MaskRCNN.predict)

Platform kernels (XLA:CPU's Winograd convs, ...) come in through one attribute:
``MaskRCNN(config, kernels=mrcnn_jax.kernels.select())``; the parameters are the same.
Keypoint R-CNN is the same module with ``config.keypoint.enabled`` (and, as torchvision's
``keypointrcnn_resnet50_fpn``, ``config.mask.enabled = False``).
"""

from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.modeling.kernel_set import KernelSet
from mrcnn_jax.modeling.kernel_set import PLAIN
from mrcnn_jax.modeling.mask_rcnn import init_variables
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.mask_rcnn import trainable_mask
from mrcnn_jax.modeling.resnet import REMAT_CHOICES

__all__ = [
    "KernelSet",
    "MaskRCNN",
    "PLAIN",
    "REMAT_CHOICES",
    "init_variables",
    "model_config",
    "tiny_model_config",
    "trainable_mask",
]
