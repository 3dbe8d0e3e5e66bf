"""Test helper: torch ``state_dict`` -> Flax params, by the naming rules the model follows.

A minimal stand-in for the later weight converter, used to check the layout against
torchvision modules: ``a.b.weight`` -> ``{'a': {'b': {'kernel' | 'scale': ...}}}``, conv
weights OIHW -> HWIO, linear weights transposed, BatchNorm ``running_mean/var`` -> ``mean/var``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np


def torch_to_flax(state_dict, rename: Optional[Callable[[List[str]], List[str]]] = None) -> Dict:
  """Nested float32 numpy params from a torch ``state_dict``.

  Args:
    state_dict: name -> torch.Tensor.
    rename: maps a module path (list of names, leaf excluded) to the Flax module path.
  """
  params: Dict = {}
  for name, tensor in state_dict.items():
    parts = name.split(".")
    module, leaf = parts[:-1], parts[-1]
    if leaf == "num_batches_tracked":
      continue
    a = tensor.detach().cpu().numpy().astype(np.float32)
    if leaf == "weight":
      if a.ndim == 4:
        leaf, a = "kernel", a.transpose(2, 3, 1, 0)
      elif a.ndim == 2:
        leaf, a = "kernel", a.T
      else:
        leaf = "scale"
    elif leaf == "running_mean":
      leaf = "mean"
    elif leaf == "running_var":
      leaf = "var"
    if rename is not None:
      module = rename(module)
    node = params
    for m in module:
      node = node.setdefault(m, {})
    node[leaf] = a
  return params


def randomize_frozen_bn(model, generator) -> None:
  """Gives every FrozenBatchNorm2d/BatchNorm2d of ``model`` non-trivial statistics and affine."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.ops.misc import FrozenBatchNorm2d  # pylint: disable=g-import-not-at-top

  for m in model.modules():
    if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
      c = m.weight.shape[0]
      with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
        m.bias.copy_(torch.randn(c, generator=generator) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
