"""``scripts/train.py`` with its data and workdir in a bucket (the emulator of conftest.py).

The runs are test_faults.py's: the same tiny config and data (here uploaded to the bucket), the
same commit hold, sharing its compilation cache and its uninterrupted local reference run. A
SIGTERM save, a ``kill -9`` mid-write (an uncommitted step folder left in the bucket) and the
restarts must end with the reference's parameters bit for bit: where the files live changes
nothing. Two processes share one ``gs://`` workdir. Bad paths fail in one line before compiling.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
import tensorflow as tf
from etils import epath

from mrcnn_jax.run import checkpoint as ckpt_lib
from tests.training import test_faults as faults
from tests.training.test_faults import reference, setup  # noqa: F401  (fixtures)

# Shares test_faults.py's reference run (tests.run_once).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket_setup(gcs, setup):  # noqa: F811
  """test_faults' setup with the data set in a bucket and the emulator's environment."""
  bucket = gcs.new_bucket("train")
  gcs.upload(str(setup["shared"] / "shapes"), f"{bucket}/shapes")
  config = str(setup["base"] / "gcs_config.py")
  with open(setup["config"]) as f:
    text = f.read()
  with open(config, "w") as f:
    f.write(re.sub(r"data = .*", f"data = {bucket + '/shapes'!r}", text))
  env = dict(setup["env"])
  env.update(gcs.env)
  for k in ("GOOGLE_APPLICATION_CREDENTIALS",):
    env.pop(k, None)
  return dict(setup, config=config, env=env, bucket=bucket)


class Run(faults.Run):
  """test_faults' ``Run`` with its log in the local test folder (the workdir is a URL)."""

  def __init__(self, setup: dict, workdir: str, *flags: str, stall: Optional[str] = None):
    self.workdir = workdir
    self.log_path = str(setup["base"] / f"gcs_run.{next(faults._LOG_IDS)}.log")  # pylint: disable=protected-access
    prefix = [faults.WORKER, f"--stall={stall}"] if stall else []
    cmd = [sys.executable, *prefix, faults.TRAIN, "--config", setup["config"], "--workdir",
           workdir, *flags]
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                 cwd=faults.ROOT, env=setup["env"])
    faults._ALL_RUNS.append(self)  # pylint: disable=protected-access


def _steps(workdir: str) -> tuple[list[int], list[int]]:
  """(committed, uncommitted) step folders under a bucket workdir's ``checkpoints/``."""
  d = epath.Path(workdir) / ckpt_lib.CHECKPOINT_DIR
  names = [p.name for p in d.iterdir()] if d.exists() else []
  steps = sorted(int(n) for n in names if n.isdigit())
  done = [s for s in steps if (d / str(s) / "commit_success.txt").exists()]
  return done, [s for s in steps if s not in done]


def test_sigterm_and_kill9_in_a_bucket_resume_exactly(bucket_setup, reference):  # noqa: F811
  workdir = f"{bucket_setup['bucket']}/chain"

  # SIGTERM while checkpoint 2's commit is held: a checkpoint at the current step, exit 0.
  run = Run(bucket_setup, workdir, "--config.train.num_steps=6", stall="2:3")
  run.wait_for(r"checkpoint 2 is written, holding its commit")
  run.kill(signal.SIGTERM)
  log = run.ok()
  stopped = int(re.search(r"SIGTERM[^\n]*: saving a checkpoint at step (\d+)", log).group(1))
  assert _steps(workdir) == ([2, stopped] if stopped == 3 else [2, 4], [])

  # kill -9 while checkpoint 6 is written but not committed (no commit_success.txt yet).
  run = Run(bucket_setup, workdir, "--config.train.num_steps=20", stall="6:120")
  run.wait_for(rf"starting at step {stopped} of 20 from workdir checkpoint at step {stopped}\b")
  run.wait_for(r"checkpoint 6 is written, holding its commit")
  run.kill()
  committed, partial = _steps(workdir)
  assert partial == [6] and 6 not in committed, (committed, partial)

  # Restart saving every 4 steps, with TensorBoard and evaluation at the end: the partial
  # folder is removed, never restored, and the run ends on the reference's parameters.
  log = Run(bucket_setup, workdir, "--config.checkpoint.every_steps=4",
                   "--config.log.tensorboard=True", "--config.eval.at_end=True").ok()
  assert "removing an uncommitted checkpoint left by an interrupted run" in log
  assert "starting at step 4 of 8 from workdir checkpoint at step 4" in log
  committed, partial = _steps(workdir)
  assert partial == [] and committed[-1] == faults.NUM_STEPS and 6 not in committed
  assert (epath.Path(workdir) / "config.json").exists()
  assert tf.io.gfile.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
  assert tf.io.gfile.glob(f"{workdir}/eval/metrics_*.json")
  faults.assert_same_params(reference, workdir)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_share_a_bucket_workdir(bucket_setup, reference):  # noqa: F811
  """2 processes x 1 device write one workdir in the bucket; the result is the 1-process
  reference's (same global batches; the gradient sum's order may differ)."""
  workdir = f"{bucket_setup['bucket']}/two_hosts"
  port = _free_port()
  # Cheaper XLA CPU compiles (as test_multiprocess.py): compiling is most of this test's time.
  env = dict(bucket_setup["env"], XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  procs = []
  for i in range(2):
    log = open(bucket_setup["base"] / f"two_hosts.{i}.log", "w+")  # pylint: disable=consider-using-with
    cmd = [sys.executable, faults.TRAIN, "--config", bucket_setup["config"], "--workdir",
           workdir, f"--coordinator_address=localhost:{port}", "--num_processes=2",
           f"--process_id={i}"]
    procs.append((subprocess.Popen(cmd, cwd=faults.ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  try:
    for proc, log in procs:
      rc = proc.wait(timeout=faults.RUN_TIMEOUT)
      log.seek(0)
      text = log.read()
      assert rc == 0 and "Traceback" not in text, text[-3000:]
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
  assert _steps(workdir) == ([4, 6, 8], [])
  ref, got = ckpt_lib.load_params(reference), ckpt_lib.load_params(workdir)
  assert sorted(got) == sorted(ref)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_no_permission_for_the_workdir_is_one_line_before_compiling(bucket_setup):
  proc = subprocess.run(
      [sys.executable, faults.TRAIN, "--config", bucket_setup["config"], "--workdir",
       "gs://no-access-bucket/run"],
      cwd=faults.ROOT, env=bucket_setup["env"], capture_output=True, text=True, timeout=120)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith("error: workdir: no permission for gs://no-access-bucket/run"), \
      errors[0]
  assert "Traceback" not in proc.stderr and "compiled" not in proc.stderr


@pytest.mark.parametrize("field, value, error, message", [
    ("workdir", "gs://missing-bucket-x/run", FileNotFoundError,
     r"workdir: bucket gs://missing-bucket-x does not exist \(gs://missing-bucket-x/run\)$"),
    ("data.train_annotations", "{bucket}/shapes/annotations/missing.json", FileNotFoundError,
     r"config.data.train_annotations not found: gs://\S+/missing.json$"),
    ("data.train_images", "gs://missing-bucket-y/train", FileNotFoundError,
     r"config.data.train_images: bucket gs://missing-bucket-y does not exist"),
    ("init_weights", "gs://no-access-weights/w.npz", PermissionError,
     r"config.init_weights: no permission for gs://no-access-weights/w.npz"),
    ("resume", "{bucket}/no_such_run", FileNotFoundError,
     r"config.resume not found: gs://\S+/no_such_run$"),
])
def test_bad_bucket_paths_fail_in_one_line_before_any_device_work(
    bucket_setup, monkeypatch, field, value, error, message):
  from mrcnn_jax.run import sharding  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.config import load_config_file  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.training import loop  # pylint: disable=g-import-not-at-top
  config = load_config_file(bucket_setup["config"])
  value = value.format(bucket=bucket_setup["bucket"])
  workdir = f"{bucket_setup['bucket']}/bad"
  if field == "workdir":
    workdir = value
  else:
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
  def no_device_work(*args, **kwargs):
    raise AssertionError("the checks let a bad path through to the mesh")

  monkeypatch.setattr(sharding, "make_run_mesh", no_device_work)
  with pytest.raises(error) as info:
    loop.train_and_evaluate(config, workdir)
  assert "\n" not in str(info.value) and re.search(message, str(info.value)), str(info.value)
