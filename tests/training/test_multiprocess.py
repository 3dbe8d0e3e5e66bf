"""Multi-process runs: 2 local processes x 2 CPU devices behave like 1 process x 4 devices.

The processes are real (``scripts/train.py`` / ``scripts/evaluate.py`` under
``multiprocess_worker.py``), joined by ``jax.distributed`` on a free localhost port with gloo
collectives; each child gets its own ``XLA_FLAGS`` (the 8 fake devices of conftest are not
inherited). Every launch has a deadline: a hang (e.g. one process leaving a collective alone)
kills the children and fails the test instead of blocking CI.

Jobs (all from one tiny config; a shared persistent compilation cache lets later jobs load
what earlier ones compiled):

* A: 1 process x 4 devices, 4 steps + eval, reading each global batch as 2 hosts would;
* B: 2 processes x 2 devices, 4 steps (same global batches, same initialisation);
* C: ``evaluate.py`` in 2 processes on B's final checkpoint;
* D: 2 processes, 8 steps, SIGTERM to process 1 only after its step 2 (steps count from 1); E: D's restart.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mrcnn_jax.run import distributed
from tests import run_once

# One worker runs the whole module (make test: --dist loadfile); the jobs run once per session
# in any case (tests.run_once).

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "training" / "multiprocess_worker.py"
JOB_TIMEOUT = 300  # seconds per job; CI fails rather than hangs
NUM_VAL = 6


# ------------------------------------------------------------------------ fast: detection, API

@pytest.mark.parametrize("environ, tpu, expected", [
    ({}, False, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, False, "slurm"),
    # One task (srun -n1, or a batch script outside srun) is a single-process run.
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False, None),  # salloc shell: no step yet
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, False, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False, None),
    ({}, True, "tpu"),
    ({"TPU_SKIP_MDS_QUERY": "1"}, True, None),
    ({"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "a,b"}, True, "tpu"),
])
def test_detect_cluster(environ, tpu, expected):
  assert distributed.detect_cluster(environ, on_tpu_vm=tpu) == expected


def test_initialize_argument_errors():
  with pytest.raises(ValueError, match="mode must be one of"):
    distributed.initialize(mode="yes")
  with pytest.raises(ValueError, match="'off' but coordinator_address"):
    distributed.initialize("localhost:1234", 2, 0, mode="off")


def test_initialize_on_a_plain_machine_does_nothing(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORDINATOR")):
      monkeypatch.delenv(k)
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  info = distributed.initialize()
  assert info.method == "single" and not jax.distributed.is_initialized()
  assert (info.process_index, info.process_count) == (0, 1)
  assert info.device_count == jax.device_count() == info.local_device_count
  assert not distributed.preemption_sync_available()


# ------------------------------------------------------------------------- slow: real processes

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Job:
  """``num_processes`` worker processes of one run; :meth:`finish` waits with a deadline."""

  def __init__(self, root: Path, name: str, *, num_processes: int, devices_per_process: int,
               script: str, script_args: list, worker_args: tuple = (), cache_dir: Path):
    self.name, self.record_dir = name, root / f"{name}_records"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_", "XLA_"))}
    # Cheaper XLA CPU compiles (~40% less) for every job alike: compile time, not step time,
    # is what this file spends.
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    port = _free_port()
    self.procs, self.logs = [], []
    for i in range(num_processes):
      dist = ([f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
               f"--process_id={i}"] if num_processes > 1 else ["--distributed=off"])
      log = open(root / f"{name}.{i}.log", "w")
      self.logs.append(log)
      cmd = [sys.executable, str(WORKER), f"--script={script}",
             f"--record_dir={self.record_dir}", *worker_args, "--", *script_args, *dist]
      self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT))
    self.started = time.monotonic()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait()

  def finish(self, timeout: float = JOB_TIMEOUT) -> list:
    """Every process's record (``record_<i>.json``); fails on timeout or a non-zero exit."""
    deadline = self.started + timeout
    try:
      for p in self.procs:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"job {self.name} hung (> {timeout}s)\n{self._tails()}")
    finally:
      for log in self.logs:
        log.close()
    codes = [p.returncode for p in self.procs]
    if any(codes):
      self.kill()
      pytest.fail(f"job {self.name} exit codes {codes}\n{self._tails()}")
    self.seconds = time.monotonic() - self.started
    out = []
    for i in range(len(self.procs)):
      with open(self.record_dir / f"record_{i}.json") as f:
        out.append(json.load(f))
    return out

  def _tails(self) -> str:
    text = []
    for log in self.logs:
      lines = [l for l in Path(log.name).read_text().splitlines()
               if "PredictCost" not in l and "[Gloo]" not in l]
      text.append(f"--- {log.name}\n" + "\n".join(lines[-25:]))
    return "\n".join(text)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """The data set and every job's folders, shared by the xdist workers: the jobs run once per
  session (:mod:`tests.run_once`), whichever worker asks first."""
  from mrcnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  out = run_once.shared_dir(tmp_path_factory, "multiprocess_shared")

  def make_data() -> dict:
    data_lib.generate_shapes(str(out / "shapes"), num_train=16, num_val=NUM_VAL, size=64, seed=1)
    return {}

  run_once.once(out, "data", make_data)
  return out


def _train_args(root: Path, workdir: str, *extra) -> list:
  return [f"--config={WORKER}:{root / 'shapes'}", f"--workdir={root / workdir}", *extra]


@pytest.fixture(scope="module")
def phase1(root):
  """Jobs A (1 x 4 devices, + eval) and B (2 x 2 devices), run side by side."""
  return run_once.once(root, "phase1", lambda: _phase1(root))


def _phase1(root: Path) -> dict:
  cache = root / "jax_cache"
  jobs = []
  try:
    jobs.append(Job(root, "A", num_processes=1, devices_per_process=4, script="train",
                    script_args=_train_args(root, "A"),
                    cache_dir=cache))
    jobs.append(Job(root, "B", num_processes=2, devices_per_process=2, script="train",
                    script_args=_train_args(root, "B", "--config.eval.at_end=False"),
                    cache_dir=cache))
    records = {job.name: job.finish() for job in jobs}
  finally:
    for job in jobs:
      job.kill()
  print(f"\nphase 1 (A || B): {max(j.seconds for j in jobs):.0f}s")
  return records


@pytest.fixture(scope="module")
def phase2(root, phase1):
  """Job C (evaluate B's checkpoint in 2 processes) alongside D (SIGTERM) and then E (restart)."""
  del phase1  # B's checkpoint and the compilation cache
  return run_once.once(root, "phase2", lambda: _phase2(root))


def _phase2(root: Path) -> dict:
  cache = root / "jax_cache"
  sigterm_args = _train_args(root, "D", "--config.train.num_steps=8",
                             "--config.eval.at_end=False")
  jobs = []
  try:
    c = Job(root, "C", num_processes=2, devices_per_process=2, script="evaluate",
            script_args=[f"--config={WORKER}:{root / 'shapes'}", f"--workdir={root / 'C'}",
                         f"--checkpoint={root / 'B' / 'checkpoints' / '4'}"], cache_dir=cache)
    jobs.append(c)
    d = Job(root, "D", num_processes=2, devices_per_process=2, script="train",
            script_args=sigterm_args, cache_dir=cache,
            worker_args=("--sigterm_at_step=2", "--sigterm_process=1"))
    jobs.append(d)
    records = {"D": d.finish()}
    records["D_checkpoints"] = sorted(int(s) for s in os.listdir(root / "D" / "checkpoints")
                                      if s.isdigit())  # before E adds its own
    e = Job(root, "E", num_processes=2, devices_per_process=2, script="train",
            script_args=sigterm_args, cache_dir=cache)
    jobs.append(e)
    records["E"] = e.finish()
    records["C"] = c.finish()
  finally:
    for job in jobs:
      job.kill()
  print(f"\nphase 2: C {c.seconds:.0f}s, D {d.seconds:.0f}s, E {e.seconds:.0f}s")
  return records


def _params(workdir: Path, step: int):
  """A checkpoint's parameters on this process's device 0, whatever topology saved them."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = workdir / "checkpoints" / str(step) / "state"
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckpt:
    state = ckpt.restore(path, args=ocp.args.StandardRestore(fallback_sharding=device))
  assert int(state["step"]) == step
  return [(k, np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]]


@pytest.mark.slow
def test_two_processes_train_like_one(root, phase1):
  (ref,), (b0, b1) = phase1["A"], phase1["B"]
  assert (ref["process_count"], b0["process_count"], b1["process_count"]) == (1, 2, 2)
  assert {r["process_index"] for r in (b0, b1)} == {0, 1}
  for r in (ref, b0, b1):
    assert r["result"]["step"] == 4 and r["result"]["source"] == "scratch"
    assert not r["result"]["stopped_by_sigterm"]

  # The losses of every step: both processes see the same (replicated) values, and the same
  # as one process on the same global batch.
  assert b0["losses"] == b1["losses"]
  assert sorted(ref["losses"]) == sorted(b0["losses"]) == ["1", "2", "3", "4"]
  loss_diff = max(abs(ref["losses"][s][k] - b0["losses"][s][k])
                  for s in ref["losses"] for k in ref["losses"][s])
  for s in ref["losses"]:
    for k, v in ref["losses"][s].items():
      np.testing.assert_allclose(b0["losses"][s][k], v, rtol=1e-4, atol=1e-5, err_msg=f"{s} {k}")

  # One shared checkpoint folder, written by both processes together.
  assert sorted(os.listdir(root / "B" / "checkpoints")) == ["2", "4"]
  assert json.loads((root / "B" / "config.json").read_text())["train"]["num_steps"] == 4
  a4, b4, b2 = _params(root / "A", 4), _params(root / "B", 4), _params(root / "B", 2)
  assert [p for p, _ in a4] == [p for p, _ in b4]
  param_diff = max(float(np.max(np.abs(x - y))) for (_, x), (_, y) in zip(a4, b4))
  scale = max(float(np.max(np.abs(x))) for _, x in a4)
  print(f"\nmax |param diff| 1 x 4 vs 2 x 2: {param_diff:.3g} (largest |param| {scale:.3g}); "
        f"max |loss diff| {loss_diff:.3g}")
  for (path, x), (_, y) in zip(a4, b4):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # Training moved the parameters, so the comparison above could fail.
  moved = max(float(np.max(np.abs(x - y))) for (_, x), (_, y) in zip(b4, b2))
  assert moved > 100 * max(param_diff, 1e-7)


@pytest.mark.slow
def test_two_process_eval_scores_each_image_once_like_one_process(root, phase1, phase2):
  (ref,), (c0, c1) = phase1["A"], phase2["C"]
  ids0, ids1 = c0["eval_image_ids"], c1["eval_image_ids"]
  assert ids0 and ids1  # both processes scored images
  all_ids = sorted(r["id"] for r in json.loads(
      (root / "shapes" / "annotations" / "instances_val.json").read_text())["images"])
  assert len(all_ids) == NUM_VAL
  assert sorted(ids0 + ids1) == all_ids  # each image exactly once over the processes
  assert sorted(ref["eval_image_ids"]) == all_ids
  for r in (c0, c1):
    ev = r["result"]["eval"]
    assert ev["timing"]["num_images"] == NUM_VAL
    for iou in ("bbox", "segm"):  # every process returns the numbers of one process
      for name, value in ref["result"]["eval"][iou].items():
        if name != "summary":
          assert ev[iou][name] == pytest.approx(value, abs=1e-6), (iou, name)

  # The detections themselves (an untrained model's AP is ~0, so the numbers alone prove
  # little): the same records, from parameters equal up to float rounding (B's vs A's).
  ref_dets = json.loads((root / "A" / "eval" / "detections_00000004.json").read_text())
  dets = json.loads((root / "C" / "eval" / "detections_00000004.json").read_text())
  assert len(ref_dets) == len(dets) > NUM_VAL

  def key(d):
    return (d["image_id"], d["category_id"], -d["score"])

  ref_dets, dets = sorted(ref_dets, key=key), sorted(dets, key=key)
  assert [(d["image_id"], d["category_id"]) for d in ref_dets] == [
      (d["image_id"], d["category_id"]) for d in dets]
  score_diff = np.max(np.abs(np.subtract([d["score"] for d in dets],
                                         [d["score"] for d in ref_dets])))
  box_diff = np.max(np.abs(np.subtract([d["bbox"] for d in dets], [d["bbox"] for d in ref_dets])))
  print(f"\n{len(dets)} detections; max |score diff| {score_diff:.3g}, max |box diff| "
        f"{box_diff:.3g} px")
  assert score_diff < 1e-4 and box_diff < 1e-2


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(root, phase2):
  d0, d1 = phase2["D"]
  assert d1.get("sigterm_sent_at_step") == 2 and "sigterm_sent_at_step" not in d0
  stop = d0["result"]["step"]
  assert d1["result"]["step"] == stop  # the same step on both, both exited 0
  assert d0["result"]["stopped_by_sigterm"] and d1["result"]["stopped_by_sigterm"]
  assert 2 <= stop < 8, stop
  assert phase2["D_checkpoints"][-1] == stop  # the stop step's checkpoint is the newest

  e0, e1 = phase2["E"]
  for r in (e0, e1):
    assert r["result"]["source"] == f"workdir checkpoint at step {stop}"
    assert r["result"]["step"] == 8 and not r["result"]["stopped_by_sigterm"]
    assert sorted(int(s) for s in r["losses"]) == list(range(stop + 1, 9))  # resumed, not replayed
