"""mrcnn_jax.modeling: the Mask R-CNN network, its losses and its configs.

    from mrcnn_jax import modeling
    model = modeling.MaskRCNN(modeling.model_config())
    variables = modeling.init_variables(model, jax.random.key(0), (512, 512))
    out = model.apply(variables, images, method=modeling.MaskRCNN.predict)
    # CPU inference: Winograd kernel transforms computed once instead of in every call.
    fast = modeling.prepare_inference(model, variables, (512, 512))
    predict = modeling.jit_predict(model)  # on CPU: XLA's Eigen dots (inference_compiler_options)
    out = predict(fast, images)
"""

from mrcnn_jax.modeling.compiler import inference_compiler_options
from mrcnn_jax.modeling.compiler import jit_predict
from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.modeling.mask_rcnn import init_variables
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.mask_rcnn import prepare_inference
from mrcnn_jax.modeling.mask_rcnn import trainable_mask

__all__ = [
    "MaskRCNN",
    "inference_compiler_options",
    "init_variables",
    "jit_predict",
    "model_config",
    "prepare_inference",
    "tiny_model_config",
    "trainable_mask",
]
