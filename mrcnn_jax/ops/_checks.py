"""Argument checks shared by the public ops.

Public ops validate ranks and trailing dimensions eagerly (shapes are static, so this costs
nothing under ``jax.jit``) and raise ``ValueError`` naming the argument and the shape they got.
"""

from __future__ import annotations

from typing import Optional, Sequence


def check_shape(name: str, x, rank: int, last_dims: Optional[Sequence[Optional[int]]] = None) -> None:
  """Raises ``ValueError`` unless ``x`` has ``rank`` dims ending in ``last_dims``.

  Args:
    name: the argument's name, used in the message.
    x: an array (anything with ``.shape``).
    rank: the required number of dimensions.
    last_dims: required sizes of the trailing dimensions; ``None`` entries are free.
  """
  shape = tuple(getattr(x, "shape", ()))
  if len(shape) != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {shape}")
  if last_dims is not None:
    tail = shape[len(shape) - len(last_dims):]
    for got, want in zip(tail, last_dims):
      if want is not None and got != want:
        want_s = tuple("*" if d is None else d for d in last_dims)
        raise ValueError(f"{name} must end in dims {want_s}, got shape {shape}")
