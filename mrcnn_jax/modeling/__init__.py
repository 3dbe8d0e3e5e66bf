"""mrcnn_jax.modeling: the Mask R-CNN network, its losses and its configs.

    from mrcnn_jax import modeling
    model = modeling.MaskRCNN(modeling.model_config())
    variables = modeling.init_variables(model, jax.random.key(0), (512, 512))
    out = model.apply(variables, images, method=modeling.MaskRCNN.predict)
"""

from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.modeling.mask_rcnn import init_variables
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.mask_rcnn import trainable_mask

__all__ = [
    "MaskRCNN",
    "init_variables",
    "model_config",
    "tiny_model_config",
    "trainable_mask",
]
