"""Wall and CPU clocks, and medians of timed runs that take turns."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence, Tuple

# Idle worker threads of the framework that just ran spin for a while before they sleep
# (OpenMP's wait policy; XLA's thread pool): a run started at once would share the cores.
PAUSE_S = 1.0


class Clock:
  """Wall seconds and this process's CPU seconds (all threads) of a block of work.

  On a shared machine wall time is inflated by other processes; CPU seconds much less so, so
  both are reported.
  """

  def __enter__(self) -> "Clock":
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc) -> None:
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu


def median_times(fns: Sequence[Callable[[], object]], repeats: int, pause_s: float = PAUSE_S
                 ) -> Tuple[List[Tuple[float, float]], List[List[float]]]:
  """Per function, (median wall s, median CPU s) of ``repeats`` calls after one warm-up call.

  The functions take turns (a, b, a, b, ...), so a change in the machine's speed during the run
  (other tenants of a shared host) affects all of them alike instead of whichever ran then.

  Returns:
    The medians per function, and per function its ``repeats`` wall times in order.
  """
  for fn in fns:
    fn()  # warm-up (allocations, caches)
  walls, cpus = [[] for _ in fns], [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      time.sleep(pause_s)
      with Clock() as c:
        fn()
      walls[i].append(c.wall)
      cpus[i].append(c.cpu)
  return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)], walls


def median_wall_time(fn: Callable[[], object], repeats: int) -> float:
  """Median wall seconds of ``repeats`` back-to-back calls of ``fn`` after one warm-up call."""
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def back_to_back_seconds(call: Callable[[], object], calls: int) -> float:
  """Seconds for ``calls`` calls dispatched back to back, one ``jax.block_until_ready`` on the
  last result (no host sync in between, as a training or serving loop runs)."""
  import jax  # pylint: disable=import-outside-toplevel  # timing itself needs no JAX
  start = time.perf_counter()
  out = None
  for _ in range(calls):
    out = call()
  jax.block_until_ready(out)
  return time.perf_counter() - start
