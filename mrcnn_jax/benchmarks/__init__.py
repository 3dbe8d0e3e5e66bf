"""Benchmark and profiling logic; ``scripts/`` only parse flags and call it.

Modules are imported explicitly (nothing here imports them), so that
``torchvision_reference``, the one module that imports torch, is loaded only by the entry points
that compare against torchvision (directly or through ``training_vs_torchvision``, which
imports it first), and before anything pulls TensorFlow in:

* ``programs``              the model, predict and train-step programs every benchmark compiles
* ``synthetic``             random inputs in the batch contract, the default config at a size
* ``timing``                wall and CPU clocks, medians of alternating runs
* ``threads``               equal thread counts for JAX and torch (CPU affinity)
* ``model_vs_torchvision``  the whole model against torchvision's, in isolated processes
* ``torchvision_reference`` torchvision's side of the comparisons (imports torch)
* ``training_vs_torchvision`` our training against torchvision's: curves and AP over seeds
* ``ops``                   RoIAlign and NMS against torchvision's
* ``input_pipeline``        images/s of the training input pipeline
* ``profiling``             per-module time of the compiled model from a profiler trace
* ``collectives``           collective ops and their bytes in compiled HLO
* ``scaling``               parameters, step FLOPs and gradient traffic (docs/scaling.md)
* ``recipe``                train step and predict at a COCO recipe's shape: img/s, memory, MFU
* ``hlo_audit``             convolutions and dots of a program by dtype (the bf16 audit)
* ``inference_sweep``       predict over batch sizes x shapes x dtypes; exported vs in-process
* ``batched_predict``       one-by-one against batched (and overlapped) prediction

This package sits above every other one: it may import anything in ``mrcnn_jax``, and nothing
in ``mrcnn_jax`` imports it.
"""
