"""mrcnn_jax: Mask R-CNN in JAX/Flax as pure, static-shape functions.

Subpackages (imported explicitly, so a notebook that wants only ``mrcnn_jax.ops``
does not pay for TensorFlow or Flax):

* ``mrcnn_jax.ops``        pure jnp detection ops (boxes, anchors, NMS, RoIAlign, ...)
* ``mrcnn_jax.modeling``   Flax modules: ResNet, FPN, RPN, RoI heads, losses
* ``mrcnn_jax.data``       tf.data input pipeline and the synthetic shapes data set
* ``mrcnn_jax.training``   train state, optimizer, sharding, train step, loop
* ``mrcnn_jax.evaluation`` COCO evaluation with pycocotools
* ``mrcnn_jax.inference``  predictor and visualisation
* ``mrcnn_jax.convert``    torchvision / Detectron2 weight importers
"""

__version__ = "0.1.0"
