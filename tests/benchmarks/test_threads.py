"""``--threads`` gives both frameworks the same threads (benchmarks.threads and the scripts).

torchvision gets ``torch.set_num_threads``; JAX gets a process pinned to that many cores,
which works only because XLA:CPU sizes its thread pool from the CPU affinity of the thread that
starts its client. The thread-count tests check that premise, both ways the benchmarks pin (a
child started on the cores; this process pinned before JAX starts), so a jaxlib that stopped
doing so would fail here rather than quietly give JAX every core again.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mrcnn_jax.benchmarks import threads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def test_cpu_cores_are_the_first_allowed_ones_and_no_more():
  allowed = sorted(os.sched_getaffinity(0))
  assert threads.cpu_cores(1) == allowed[:1]
  assert threads.cpu_cores(len(allowed)) == allowed
  with pytest.raises(ValueError, match=f"--threads={len(allowed) + 1}: .* {len(allowed)} cores"):
    threads.cpu_cores(len(allowed) + 1)
  with pytest.raises(ValueError, match="--threads=0"):
    threads.cpu_cores(0)


@pytest.mark.parametrize("script,args", [("benchmark.py", ["--skip_train"]),
                                         ("benchmark_ops.py", [])])
def test_more_threads_than_cores_is_one_line(script, args):
  n = len(os.sched_getaffinity(0)) + 1
  proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), f"--threads={n}",
                         *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and f"--threads={n}: this process may run on" in errors[0]
  assert "Traceback" not in proc.stderr


def test_benchmark_ops_runs_on_the_cores_it_names():
  proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "benchmark_ops.py"),
                         "--threads=1", "--cases=roi_14x14", "--repeats=1"],
                        capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  first = sorted(os.sched_getaffinity(0))[0]
  assert f"with 1 threads, both on cores [{first}]" in proc.stdout, proc.stdout
  assert "| RoIAlign 100 RoIs 14x14" in proc.stdout


# Prints how many threads XLA's CPU client runs its Eigen work on, once the client exists.
_COUNT_XLA_THREADS = """
import os, sys, jax, jax.numpy as jnp
if len(sys.argv) > 1:  # pin this process first, as benchmark_ops.py does
  os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(",")])
x = jnp.ones((512, 512))
jax.block_until_ready(x @ x)
tasks = os.listdir("/proc/self/task")
print(sum(open(f"/proc/self/task/{t}/comm").read().startswith("tf_XLAEigen") for t in tasks))
"""


@pytest.mark.parametrize("pinned", ["one core", "every core"])
@pytest.mark.parametrize("how", ["started on the cores", "pinned before JAX starts"])
def test_a_process_on_n_cores_runs_n_xla_threads(pinned, how):
  allowed = sorted(os.sched_getaffinity(0))
  cores = allowed[:1] if pinned == "one core" else allowed
  if how == "started on the cores":  # benchmark.py's measuring processes
    with threads.started_on(cores):
      proc = subprocess.run([sys.executable, "-c", _COUNT_XLA_THREADS], capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert sorted(os.sched_getaffinity(0)) == allowed  # this process is set back
  else:  # benchmark_ops.py
    proc = subprocess.run([sys.executable, "-c", _COUNT_XLA_THREADS,
                           ",".join(map(str, cores))],
                          capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert int(proc.stdout.split()[-1]) == len(cores), proc.stdout
