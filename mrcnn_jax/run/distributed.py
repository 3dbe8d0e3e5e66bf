"""Multi-process start-up: ``jax.distributed.initialize`` where a cluster is detected or asked for.

Call :func:`initialize` first thing in a program, before any other JAX call (the backends
must not exist yet). One process per host (TPU) or per host / per GPU (SLURM, Open MPI);
afterwards ``jax.devices()`` lists the devices of every process, so the run's mesh
(:func:`mrcnn_jax.run.sharding.make_run_mesh`) spans all hosts, and each process feeds its own
slice of the batch.

``mode``:

* ``'auto'`` (default): initialise when explicit settings are given (``coordinator_address``
  etc. or ``JAX_COORDINATOR_ADDRESS``) or when :func:`detect_cluster` finds a multi-process job:
  a SLURM step of several tasks (``srun``), an Open MPI job of several ranks (``mpirun``), or a
  Cloud TPU VM (all workers of a pod run the same command; JAX reads the topology from the TPU
  metadata). Elsewhere (a laptop, one GPU box, ``srun -n1``) nothing happens.
* ``'on'``: always initialise (JAX then needs to detect the cluster or get explicit settings).
* ``'off'``: never; a single-process run.

On CPU, processes exchange collectives through gloo (``jax_cpu_collectives_implementation``),
which is what the tests use: 2 local processes with 2 fake CPU devices each stand in for hosts.

A process that dies without a word (``kill -9``, a lost host) is noticed by :class:`PeerWatch`
within seconds, so the others can stop cleanly instead of waiting for JAX's own heartbeat
timeout (which ends them with a C++ fatal error).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Callable, Mapping, Optional, Sequence, Union

from absl import logging
import jax
from jax.experimental import multihost_utils

MODES = ("auto", "on", "off")

# What JAX's own SLURM / Open MPI detection reads (jax._src.clusters); a job of one task is left
# alone, since there JAX would also restrict each process to one GPU.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"
_TPU_HOSTS_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """Where this process stands after :func:`initialize`.

  Attributes:
    process_index, process_count: this process and the number of processes.
    local_device_count: devices this process drives.
    device_count: devices of all processes (the mesh's size with ``num_devices=0``).
    method: ``'single'`` (not initialised), ``'explicit'``, or the detected cluster
      (``'slurm'``, ``'openmpi'``, ``'tpu'``, ``'jax'`` for ``mode='on'`` without either).
  """
  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  method: str


def _int(value: Optional[str]) -> int:
  try:
    return int(value) if value is not None else 0
  except ValueError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  """Whether ``import jax`` found TPU chips with libtpu (JAX's own Cloud TPU check)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):  # private module moved: fall back to the env hints
    return any(k in os.environ for k in _TPU_HOSTS_VARS)


def detect_cluster(environ: Optional[Mapping[str, str]] = None, *,
                   on_tpu_vm: Optional[bool] = None) -> Optional[str]:
  """The multi-process launcher this process runs under, or ``None`` on a plain machine.

  Args:
    environ: the environment to read (default ``os.environ``).
    on_tpu_vm: whether this is a Cloud TPU VM (default: JAX's check at import).

  Returns:
    ``'slurm'`` (an ``srun`` step of more than one task), ``'openmpi'`` (more than one rank),
    ``'tpu'`` (a Cloud TPU VM whose worker list JAX can read), or ``None``.
  """
  env = os.environ if environ is None else environ
  if all(k in env for k in _SLURM_VARS) and _int(env.get("SLURM_NTASKS")) > 1:
    return "slurm"
  if _int(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
    return "openmpi"
  on_tpu_vm = _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm
  # With TPU_SKIP_MDS_QUERY set (no metadata server) JAX finds the workers only from env vars.
  if on_tpu_vm and ("TPU_SKIP_MDS_QUERY" not in env or any(k in env for k in _TPU_HOSTS_VARS)):
    return "tpu"
  return None


def _use_gloo_on_cpu() -> None:
  """CPU processes need a collectives backend; gloo ships with jaxlib (the default in new JAX)."""
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:  # a JAX without the option
    return
  if current in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Union[int, Sequence[int]]] = None, *,
               mode: str = "auto", initialization_timeout: int = 300) -> DistributedInfo:
  """Starts JAX's multi-process runtime when this is a multi-process job; logs the rank.

  Must run before any other JAX call in the process. Calling it again is a no-op.

  Args:
    coordinator_address: ``host:port`` of process 0, reachable from every process (the port
      is free and the same for all). Not needed under SLURM, Open MPI 4 or on Cloud TPU.
    num_processes: the number of processes (detected under those launchers).
    process_id: this process's rank in ``[0, num_processes)`` (detected likewise).
    local_device_ids: restrict this process to these local devices (e.g. one GPU each).
    mode: ``'auto'``, ``'on'`` or ``'off'`` (see the module docstring).
    initialization_timeout: seconds to wait for every process to connect.

  Returns:
    A :class:`DistributedInfo`.

  Raises:
    ValueError: an unknown ``mode``; explicit settings with ``mode='off'``; an Open MPI job
      whose coordinator JAX cannot find (Open MPI 5: pass ``coordinator_address``).
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id,
                                         local_device_ids))
  if mode == "off" and explicit:
    raise ValueError("distributed mode is 'off' but coordinator_address / num_processes / "
                     "process_id / local_device_ids were given")
  method = "single"
  if jax.distributed.is_initialized():
    method = "already initialized"
  elif mode != "off":
    cluster = detect_cluster()
    explicit = explicit or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if mode == "on" or explicit or cluster is not None:
      if cluster == "openmpi" and not (coordinator_address or _OMPI_URI in os.environ
                                       or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        raise ValueError(
            "an Open MPI job without OMPI_MCA_orte_hnp_uri (Open MPI 5?): JAX cannot find the "
            "coordinator; pass coordinator_address='<rank 0 host>:<free port>'")
      if cluster == "openmpi" and _OMPI_URI not in os.environ:
        # JAX reads the ranks only together with the URI; take them from Open MPI's env.
        num_processes = (_int(os.environ.get("OMPI_COMM_WORLD_SIZE"))
                         if num_processes is None else num_processes)
        process_id = (_int(os.environ.get("OMPI_COMM_WORLD_RANK"))
                      if process_id is None else process_id)
      _use_gloo_on_cpu()
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 local_device_ids=local_device_ids,
                                 initialization_timeout=initialization_timeout)
      method = "explicit" if explicit else (cluster or "jax")
  info = DistributedInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                         local_device_count=jax.local_device_count(),
                         device_count=jax.device_count(), method=method)
  # Every process logs this line (not only process 0): it is how one checks that all joined.
  logging.info("process %d/%d (%s): %d local devices [%s], %d global devices",
               info.process_index, info.process_count, info.method, info.local_device_count,
               ", ".join(str(d) for d in jax.local_devices()[:8]) +
               (", ..." if info.local_device_count > 8 else ""), info.device_count)
  return info


def preemption_sync_available() -> bool:
  """Whether JAX's preemption service runs (multi-process, ``jax_enable_preemption_service``).

  It then owns SIGTERM: a notifier installed by ``jax.distributed.initialize`` catches it (the
  process keeps running) and ``multihost_utils.reached_preemption_sync_point(step)`` turns true
  on every process at the same step.
  """
  if jax.process_count() == 1:
    return False
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
  except ImportError:
    return False


_barrier_count = 0


def barrier(name: str, *, timeout_s: int = 3600) -> None:
  """Blocks until every process arrives here; a no-op on one process.

  Uses the coordination service (no device collective), so it may wait as long as
  ``timeout_s`` for a process that is still compiling. Every process must pass the same
  barriers in the same order.
  """
  global _barrier_count
  if jax.process_count() == 1:
    return
  _barrier_count += 1
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None:  # not started by jax.distributed (e.g. a launcher of its own)
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"mrcnn_jax/{name}/{_barrier_count}", timeout_in_ms=timeout_s * 1000)


def compile_together(fn, *args, name: str):
  """``fn`` compiled for ``args`` ahead of its first run, after which all processes meet.

  Several processes: a process that compiles faster (a persistent-cache hit: only process 0
  writes that cache) would otherwise start the first collective while the others still
  compile, and CPU collectives (gloo) give up after 30 s there. One process, or an ``fn``
  without ``lower``: ``fn`` unchanged (compiled on first call as usual).

  Returns:
    The compiled executable (same calling convention as ``fn`` for these argument shapes).
  """
  if jax.process_count() == 1 or not hasattr(fn, "lower"):
    return fn
  compiled = fn.lower(*args).compile()
  barrier(name)
  return compiled


# ------------------------------------------------------------------------ a process that dies

_ALIVE_KEY = "mrcnn_jax/peer_watch/alive/"
_GONE_KEY = "mrcnn_jax/peer_watch/gone/"
_DONE = "done"


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return getattr(jax_distributed.global_state, "client", None)


class PeerWatch:
  """Notices a process of the run that is gone (killed, its host lost) and names it.

  JAX's own check is the coordination service's heartbeat: after ``heartbeat_timeout_seconds``
  (100 s) it ends every process with a C++ fatal error and a stack dump, while a collective with
  the dead process either fails at once (gloo: "Connection closed by peer") or hangs until then.
  This watch answers sooner, through the coordination service's key-value store: every process
  bumps a counter every ``interval_s``; process ``i`` reads the counter of ``(i + 1) % n`` only
  (traffic grows with ``n``, not ``n**2``); a counter that has not moved for ``timeout_s`` means
  that process is gone. Its finder posts the index for everyone, every watch reads the posts,
  and each process calls ``on_lost(index)`` once, from the watch's thread (the caller decides how
  to leave: a blocked collective never returns, so ``on_lost`` typically ends the process).

  A process that leaves the ``with`` block normally marks itself done and is never reported. If
  the coordinator (process 0) itself is gone, the key-value store goes with it: ``on_lost(0)``
  after ``timeout_s`` without an answer (JAX usually ends the process before that).

  A no-op on one process (or where ``jax.distributed`` did not start the run).

  Args:
    on_lost: called with the index of the process that is gone.
    interval_s: seconds between beats and between checks.
    timeout_s: silence after which a process counts as gone; far below JAX's heartbeat timeout,
      far above any stall of a live process (the counter is bumped by a thread of its own,
      which runs while the main thread computes, compiles or waits in a collective).
  """

  def __init__(self, on_lost: Callable[[int], None], *, interval_s: float = 1.0,
               timeout_s: float = 10.0):
    self._on_lost = on_lost
    self._interval_s = float(interval_s)
    self._timeout_s = float(timeout_s)
    self._client = _client() if jax.process_count() > 1 else None
    self._stop = threading.Event()
    self._found = threading.Event()
    self._lost: Optional[int] = None
    self._thread: Optional[threading.Thread] = None

  @property
  def lost(self) -> Optional[int]:
    """The index of the process found gone, or ``None``."""
    return self._lost

  def wait_for_lost(self, timeout_s: Optional[float] = None) -> Optional[int]:
    """Blocks until a process is found gone (``on_lost`` has run) or ``timeout_s`` passes.

    A collective that fails in the main thread may be the first sign of a dead peer; waiting
    here (by default one ``timeout_s`` plus two checks) tells that apart from other errors.
    """
    if self._thread is None:
      return None
    self._found.wait(self._timeout_s + 2 * self._interval_s if timeout_s is None else timeout_s)
    return self._lost

  def __enter__(self) -> "PeerWatch":
    if self._client is not None:
      self._beat(0)
      self._thread = threading.Thread(target=self._run, name="mrcnn_jax-peer-watch", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    if exc_type is None and self._lost is None:
      try:
        self._client.key_value_set(_ALIVE_KEY + str(jax.process_index()), _DONE,
                                   allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  # the run succeeded; nothing to report
        pass

  def _beat(self, count: int) -> None:
    self._client.key_value_set(_ALIVE_KEY + str(jax.process_index()), str(count),
                               allow_overwrite=True)

  def _report(self, index: int) -> None:
    self._lost = index
    self._found.set()
    self._on_lost(index)

  def _run(self) -> None:
    me, n = jax.process_index(), jax.process_count()
    peer = (me + 1) % n
    count, seen = 0, None
    last_change = last_answer = time.monotonic()
    while not self._stop.wait(self._interval_s):
      now = time.monotonic()
      try:
        count += 1
        self._beat(count)
        gone = self._client.key_value_dir_get(_GONE_KEY)
        if gone:
          return self._report(int(gone[0][0].rsplit("/", 1)[-1]))
        try:
          value = self._client.key_value_try_get(_ALIVE_KEY + str(peer))
        except Exception as e:  # pylint: disable=broad-except  # not posted yet: NOT_FOUND
          if "NOT_FOUND" not in str(e):
            raise
          value = None
        last_answer = now
      except Exception:  # pylint: disable=broad-except  # the coordinator does not answer
        if now - last_answer > self._timeout_s:
          return self._report(0)
        continue
      if value == _DONE:
        continue  # finished normally; it may well exit before this process does
      if value != seen:
        seen, last_change = value, now
      elif now - last_change > self._timeout_s:
        try:
          self._client.key_value_set(_GONE_KEY + str(peer), "", allow_overwrite=True)
        except Exception:  # pylint: disable=broad-except  # this process reports it all the same
          pass
        return self._report(peer)
