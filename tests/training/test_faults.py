"""Faults against the real entry point: SIGTERM, kill -9 (in training, mid checkpoint write), NaN,
a restart with another model.

Every run is ``python scripts/train.py --config <tiny config> --workdir ...`` in a subprocess on
one CPU device, on the built-in synthetic shapes data. Each interrupted run is restarted and must
end with the same parameters as one uninterrupted run (the module's reference run). Kills are
timed by the run's log lines, never by sleeps alone; where the moment matters, a checkpoint's
commit is held open (``--stall=STEP:SECONDS``), so the run cannot commit it before the signal
lands. Those runs and the NaN run go through tests/training/fault_worker.py, which runs
scripts/train.py unchanged with the fault patched in (the commit held, or one input batch
poisoned).

Compiling the tiny model is most of a run's cost: the runs share one persistent compilation
cache (the reference run fills it), scenarios are chained in as few processes as they allow, and
under pytest-xdist the workers share the data, the cache and the reference run (file lock).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import pytest

from mrcnn_jax import data as data_lib
from mrcnn_jax.run import checkpoint as ckpt_lib
from tests import run_once

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
WORKER = os.path.join(ROOT, "tests", "training", "fault_worker.py")
NUM_STEPS = 8  # the reference run; checkpoints every 2 steps; the rate decays at step 5
RUN_TIMEOUT = 300  # seconds per process (the first one compiles)
TMP_MARK = ".orbax-checkpoint-tmp"
_LOG_IDS = itertools.count()
_ALL_RUNS: list = []

# tests/storage/test_train_gcs.py shares this module's reference run (tests.run_once: whichever
# worker asks first computes it, the other waits for it).
pytestmark = pytest.mark.slow

CONFIG = '''
from mrcnn_jax import config as config_lib
from mrcnn_jax.data import shapes_data_paths
from mrcnn_jax.modeling.config import tiny_model_config


def get_config(arg=None):
  data = {data!r}
  c = config_lib.get_base_config()
  c.data.update(shapes_data_paths(data))
  c.data.image_size = (64, 64)
  c.data.max_instances = 8
  c.data.mask_size = 16
  c.model = tiny_model_config(num_classes=4)
  c.train.batch_size = 2
  c.train.num_steps = {num_steps}
  c.train.warmup_steps = 2
  c.train.decay_steps = (5,)
  c.checkpoint.every_steps = 2
  c.checkpoint.max_to_keep = 3
  c.eval.at_end = False
  c.log.every_steps = 1
  c.log.tensorboard = False
  return c
'''


class Run:
  """One ``scripts/train.py`` process; its output goes to ``<workdir>.<n>.log`` (polled)."""

  def __init__(self, setup: dict, workdir: str, *flags: str, stall: Optional[str] = None,
               nan_step: Optional[int] = None):
    self.workdir = workdir
    self.log_path = f"{workdir}.{next(_LOG_IDS)}.log"
    env = dict(setup["env"])
    faults = ([f"--stall={stall}"] if stall else []) + (
        [f"--nan-step={nan_step}"] if nan_step is not None else [])
    prefix = [WORKER, *faults] if faults else []
    cmd = [sys.executable, *prefix, TRAIN, "--config", setup["config"], "--workdir", workdir,
           *flags]
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env=env)
    _ALL_RUNS.append(self)

  def text(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def wait_for(self, pattern: str, timeout: float = RUN_TIMEOUT) -> re.Match:
    """Polls the log until ``pattern`` matches; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while True:
      match = re.search(pattern, self.text())
      if match:
        return match
      if self.proc.poll() is not None or time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"never logged {pattern!r} (exit {self.proc.returncode}):\n"
                    f"{self.text()[-3000:]}")
      time.sleep(0.05)

  def finish(self, timeout: float = RUN_TIMEOUT) -> int:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"run did not end in {timeout} s:\n{self.text()[-3000:]}")
    self._log.close()
    return rc

  def kill(self, sig: int = signal.SIGKILL) -> None:
    if self.proc.poll() is None:
      os.kill(self.proc.pid, sig)
      self.proc.wait(timeout=60)

  def ok(self) -> str:
    """Waits for a clean exit and returns the log."""
    rc = self.finish()
    text = self.text()
    assert rc == 0 and "Traceback" not in text, f"exit {rc}:\n{text[-3000:]}"
    return text


def step_dirs(workdir: str) -> tuple[list[int], list[str]]:
  """(committed checkpoint steps, uncommitted orbax folders) under ``workdir/checkpoints``."""
  d = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  names = os.listdir(d) if os.path.isdir(d) else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def assert_same_params(reference: str, workdir: str) -> None:
  """The final parameters of ``workdir`` are bitwise those of the reference run."""
  ref = ckpt_lib.load_params(reference)
  # Training moved the parameters, so this comparison can fail.
  early = ckpt_lib.load_params(os.path.join(reference, "checkpoints", "4"))
  assert any(not np.array_equal(early[k], ref[k]) for k in ref)
  got = ckpt_lib.load_params(workdir)
  assert sorted(got) == sorted(ref)
  for k in ref:
    # Bitwise: the same executable (from the shared cache) on the same inputs, resumed exactly.
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  # Under xdist the workers' temporary folders share a parent: one data set, one compilation
  # cache and one reference run for all of them.
  shared = run_once.shared_dir(tmp_path_factory, "faults_shared")

  def make_data():
    data = str(shared / "shapes")
    data_lib.generate_shapes(data, num_train=12, num_val=4, size=64, seed=1)
    config = str(shared / "tiny_config.py")
    with open(config, "w") as f:
      f.write(CONFIG.format(data=data, num_steps=NUM_STEPS))
    return {"config": config}

  config = run_once.once(shared, "data", make_data)["config"]
  env = dict(os.environ)
  env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=str(shared / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  yield {"shared": shared, "base": tmp_path_factory.mktemp("faults"), "config": config,
         "env": env}
  for run in _ALL_RUNS:  # a failed test may leave a run held by the commit hook
    run.kill()


@pytest.fixture(scope="module")
def reference(setup):
  """The uninterrupted run's workdir; it also fills the compilation cache the others use."""
  workdir = str(setup["shared"] / "reference")

  def produce():
    log = Run(setup, workdir).ok()
    assert f"step {NUM_STEPS}/{NUM_STEPS}" in log
    assert step_dirs(workdir) == ([4, 6, 8], [])
    return {"workdir": workdir}

  return run_once.once(setup["shared"], "reference", produce)["workdir"]


@pytest.fixture(scope="module")
def side_runs(setup, reference):
  """Two independent runs, started together (they overlap), once per session.

  ``nan``: the 4th batch (step 4) has NaN boxes; checkpoint 2's commit is held 3 s, so it is
  still being written when the loss of step 4 comes back non-finite.
  ``changed_model``: a copy of the reference's checkpoints, restarted with another model.
  """
  def produce():
    shared = setup["shared"]
    changed = str(shared / "changed_model")
    shutil.rmtree(changed, ignore_errors=True)
    shutil.copytree(os.path.join(reference, "checkpoints"),
                    os.path.join(changed, "checkpoints"))
    before = step_dirs(changed)
    nan = Run(setup, str(shared / "nan"), stall="2:3", nan_step=3)
    refused = Run(setup, changed, "--config.model.fpn.channels=16",
                  "--config.model.num_classes=5")
    out = {}
    for name, run in (("nan", nan), ("changed_model", refused)):
      out[name] = {"workdir": run.workdir, "rc": run.finish(), "log": run.text()}
    out["changed_model"]["before"] = before
    return out

  return run_once.once(setup["shared"], "side_runs", produce)


def test_sigterm_kill9_and_kill9_mid_checkpoint_write_each_resume_exactly(setup, reference):
  """One workdir, four processes: SIGTERM, kill -9 in training, kill -9 mid-write, resume."""
  workdir = str(setup["base"] / "chain")

  # 1. SIGTERM: a checkpoint at the current step, exit 0. Checkpoint 2's commit is held 3 s,
  #    so the run cannot pass save(4) before the signal lands.
  run = Run(setup, workdir, "--config.train.num_steps=6", stall="2:3")
  run.wait_for(r"checkpoint 2 is written, holding its commit")
  run.kill(signal.SIGTERM)
  log = run.ok()
  stopped = int(re.search(r"SIGTERM[^\n]*: saving a checkpoint at step (\d+)", log).group(1))
  assert stopped in (3, 4), log[-2000:]
  assert step_dirs(workdir) == ([2, stopped] if stopped == 3 else [2, 4], [])
  assert ckpt_lib.load_variables(workdir)[1] == stopped

  # 2. Restart with a non-model setting changed (num_steps 6 -> 20): it resumes at the SIGTERM
  #    step. kill -9 in training, one step later. Checkpoint 6's commit is held (a backstop),
  #    so whatever the kill's latency, the newest complete checkpoint is `stopped` or 4.
  run = Run(setup, workdir, "--config.train.num_steps=20", stall="6:120")
  run.wait_for(rf"starting at step {stopped} of 20 from workdir checkpoint at step {stopped}\b")
  run.wait_for(rf"step {stopped + 1}/20")
  run.kill()
  assert run.proc.returncode == -signal.SIGKILL
  committed, _ = step_dirs(workdir)
  assert committed[-1] in (stopped, 4), committed
  resume_at = committed[-1]

  # 3. Restart: it resumes at the newest complete checkpoint. kill -9 while checkpoint 6 is
  #    written but not committed (its commit held 120 s).
  run = Run(setup, workdir, "--config.train.num_steps=20", stall="6:120")
  run.wait_for(rf"starting at step {resume_at} of 20 from workdir checkpoint at step "
               rf"{resume_at}\b")
  run.wait_for(r"checkpoint 6 is written, holding its commit")
  committed, partial = step_dirs(workdir)
  assert 6 not in committed and partial == ["6" + TMP_MARK], (committed, partial)
  assert os.listdir(os.path.join(workdir, "checkpoints", partial[0], "state"))  # files written
  run.kill()
  assert run.proc.returncode == -signal.SIGKILL

  # 4. Restart, saving every 4 steps now, so step 6 is never written again: the partial
  #    folder must be neither restored nor left behind. The run ends as the reference did.
  log = Run(setup, workdir, "--config.checkpoint.every_steps=4").ok()
  assert "removing an uncommitted checkpoint left by an interrupted run" in log
  assert "starting at step 4 of 8 from workdir checkpoint at step 4" in log
  committed, partial = step_dirs(workdir)
  assert partial == [] and committed[-1] == NUM_STEPS and 6 not in committed, committed
  assert_same_params(reference, workdir)


def test_non_finite_loss_stops_with_one_line_error(side_runs):
  rc, log = side_runs["nan"]["rc"], side_runs["nan"]["log"]
  assert rc == 1, log[-3000:]
  errors = [l for l in log.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, log[-3000:]
  # The 4th batch is poisoned: step 4, counted from 1 like the progress lines.
  assert re.match(r"error: non-finite loss or gradient at step 4: \{.*'total_loss': nan",
                  errors[0]), errors
  assert "Traceback" not in log
  assert "step 3/8" in log and "step 4/8" not in log  # stopped at the first flush after it


def test_non_finite_loss_keeps_last_good_checkpoint(side_runs):
  workdir = side_runs["nan"]["workdir"]
  committed, partial = step_dirs(workdir)
  # Checkpoint 2 was being written when the error came: the run must finish it before exiting
  # (an async save left pending dies with the interpreter), and write none after it.
  assert committed == [2] and partial == [], (committed, partial, side_runs["nan"]["log"][-2000:])
  assert ckpt_lib.load_variables(workdir)[1] == 2
  assert all(np.isfinite(v).all() for v in ckpt_lib.load_params(workdir).values())


def test_restart_with_another_model_refuses_in_one_line(side_runs):
  result = side_runs["changed_model"]
  log = result["log"]
  errors = [l for l in log.splitlines() if l.startswith("error:")]
  assert result["rc"] == 1 and len(errors) == 1, log[-3000:]
  assert re.fullmatch(
      r"error: checkpoint \S+/changed_model/checkpoints/8 was trained with a different model "
      r"config \(model\.fpn\.channels, model\.num_classes\); "
      r"use a fresh workdir or config\.init_weights to start from its parameters", errors[0]), \
      errors[0]
  assert "Traceback" not in log
  # Nothing written, nothing deleted (lists from JSON).
  assert list(step_dirs(result["workdir"])) == [list(x) for x in result["before"]]
