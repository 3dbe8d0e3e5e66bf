"""A process of a multi-process run dies (``kill -9``): the others leave with one clear line.

Two real processes of ``scripts/train.py`` (2 CPU devices each, joined by ``jax.distributed`` on
localhost, launched like :mod:`tests.training.test_multiprocess` does); once a checkpoint is
committed, process 1 is killed. Process 0 must print ``error: process 1 of 2 is gone; last
complete checkpoint: step N; rerun the same command to resume`` with the newest committed step,
and exit with status 75 well within 30 s of the kill: no gloo traceback, no wait in JAX's
shutdown barrier, no C++ fatal-error dump (what JAX alone gives, a minute or more later).

The coordinator's own death (process 0) is not covered: JAX's client in every other process
aborts on the spot (a C++ fatal error, before Python can act).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from mrcnn_jax.run import distributed
from tests.training.test_multiprocess import Job
from tests.training.test_multiprocess import WORKER

START_TIMEOUT = 300  # seconds until the first checkpoint (compilation included)
EXIT_DEADLINE = 30  # seconds from the kill to the survivor's exit


def test_peer_watch_is_a_no_op_on_one_process():
  reported = []
  with distributed.PeerWatch(reported.append, interval_s=0.01, timeout_s=0.01) as watch:
    time.sleep(0.05)
    assert watch.wait_for_lost() is None
  assert watch.lost is None and not reported


@pytest.mark.slow
def test_killed_process_leaves_the_other_one_line_and_a_prompt_exit(tmp_path):
  from mrcnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  data_lib.generate_shapes(str(tmp_path / "shapes"), num_train=16, num_val=2, size=64, seed=1)
  workdir = tmp_path / "run"
  job = Job(tmp_path, "dead", num_processes=2, devices_per_process=2, script="train",
            script_args=[f"--config={WORKER}:{tmp_path / 'shapes'}", f"--workdir={workdir}",
                         "--config.train.num_steps=1000", "--config.eval.at_end=False"],
            cache_dir=tmp_path / "jax_cache")
  survivor, victim = job.procs
  tails = job._tails  # pylint: disable=protected-access  # the last lines of both logs
  try:
    checkpoints = workdir / "checkpoints"
    while not ocp.step.checkpoint_steps(checkpoints):
      codes = [p.poll() for p in job.procs]
      if any(c is not None for c in codes) or time.monotonic() - job.started > START_TIMEOUT:
        pytest.fail(f"no checkpoint; exit codes {codes}\n{tails()}")
      time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
      code = survivor.wait(timeout=EXIT_DEADLINE + 30)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the survivor still runs {EXIT_DEADLINE + 30}s after the kill\n"
                  f"{tails()}")
    seconds = time.monotonic() - killed
  finally:
    job.kill()
    for log in job.logs:
      log.close()

  log = Path(job.logs[0].name).read_text()
  print(f"\nsurvivor exit {code} {seconds:.1f}s after the kill")
  assert code == 75, f"exit {code}\n{log[-3000:]}"
  assert seconds < EXIT_DEADLINE, seconds
  steps = ocp.step.checkpoint_steps(checkpoints)
  lines = [l for l in log.splitlines() if "is gone" in l]
  assert lines == [f"error: process 1 of 2 is gone; last complete checkpoint: step {max(steps)}; "
                   "rerun the same command to resume"], log[-3000:]
  for dump in ("Traceback", "Fatal", "Check failure", "*** SIG", "Exception in thread"):
    assert dump not in log, f"{dump!r} in the survivor's output\n{log[-3000:]}"
  assert not re.search(r"^[EF]\d{4} ", log, re.MULTILINE), log[-3000:]  # absl C++ errors
