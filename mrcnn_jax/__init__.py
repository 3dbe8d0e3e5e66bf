"""mrcnn_jax: Mask R-CNN in JAX/Flax as pure, static-shape functions.

Subpackages (imported explicitly, so a notebook that wants only ``mrcnn_jax.ops``
does not pay for TensorFlow or Flax):

* ``mrcnn_jax.ops``        pure jnp detection ops (boxes, anchors, NMS, RoIAlign, ...)
* ``mrcnn_jax.modeling``   Flax modules, plain lax: ResNet, FPN, RPN, RoI heads, losses
* ``mrcnn_jax.data``       tf.data input pipeline and the synthetic shapes data set
* ``mrcnn_jax.kernels``    XLA:CPU algorithms the model can be built with (``kernels.select``)
* ``mrcnn_jax.run``        mesh and sharding, checks, checkpoints, distributed start-up
* ``mrcnn_jax.inference``  predictor, batched predict, mask paste and visualisation
* ``mrcnn_jax.evaluation`` COCO evaluation with pycocotools
* ``mrcnn_jax.training``   train state, optimizer, train step, loop
* ``mrcnn_jax.convert``    torchvision / Detectron2 weight importers
* ``mrcnn_jax.benchmarks`` benchmark and profiling logic behind ``scripts/``
"""

__version__ = "0.1.0"
