"""The same thread count for JAX and torch on CPU, through the CPU affinity of processes.

``torch.set_num_threads`` takes a count; XLA:CPU has no such option but sizes its thread pools
from the CPU affinity of the thread that starts its client. So a measuring process either is
started on ``threads`` cores (:func:`started_on`) or pins itself before JAX starts
(:func:`pin_this_process`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Sequence


def cpu_cores(threads: int) -> List[int]:
  """The first ``threads`` of the cores this process may run on, for a ``--threads`` flag.

  Raises:
    ValueError: there are fewer than ``threads`` such cores, or ``threads`` < 1.
  """
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= threads <= len(allowed):
    raise ValueError(f"--threads={threads}: this process may run on {len(allowed)} cores "
                     f"{allowed}, and both frameworks get the same cores")
  return allowed[:threads]


def pin_this_process(threads: int) -> List[int]:
  """Puts this thread, and the threads it starts from now on, on :func:`cpu_cores`; returns them.

  Call it before anything starts JAX's CPU client, whose thread pools are sized then.
  """
  cores = cpu_cores(threads)
  os.sched_setaffinity(0, cores)
  return cores


@contextlib.contextmanager
def started_on(cores: Optional[Sequence[int]]) -> Iterator[None]:
  """Processes started inside run on ``cores`` (all allowed ones if None).

  A child inherits the CPU affinity of the thread that starts it, so this thread is pinned
  while inside and set back after. (``subprocess``'s ``preexec_fn`` would do it in the child,
  but only by a plain ``fork`` of this multi-threaded process.)
  """
  if cores is None:
    yield
    return
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cores)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)
