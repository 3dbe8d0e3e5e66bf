"""scripts/tpu/: the gcloud commands each script issues, with a stand-in ``gcloud``.

The stand-in records its arguments and, for ``ssh --command=...``, runs the command in a
scratch home directory, so the quoting of the remote command is checked by actually running
it (one worker stands for all).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KIT = ROOT / "scripts" / "tpu"

FAKE_GCLOUD = r"""#!/usr/bin/env bash
all="$*"
printf '%s\n' "${all//$'\n'/ }" >> "$GCLOUD_LOG"
cmd=""
for a in "$@"; do
  case "$a" in --command=*) cmd="${a#--command=}";; esac
done
if [[ "$3" == "scp" ]]; then cp "$4" "$HOME/${5#*:}"; fi
if [[ -n "$cmd" ]]; then cd "$HOME" && bash -c "$cmd"; fi
"""


@pytest.fixture()
def kit_env(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  home = tmp_path / "home"
  (home / "mrcnn_jax").mkdir(parents=True)
  venv = home / "mrcnn_jax_venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "activate").write_text("export MRCNN_FAKE_VENV=1\n")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home),
             GCLOUD_LOG=str(tmp_path / "gcloud.log"), TPU_NAME="pod1", ZONE="us-central2-b",
             ACCELERATOR_TYPE="v4-32", RUNTIME_VERSION="tpu-ubuntu2204-base", PROJECT_ID="proj")
  return env, home, tmp_path / "gcloud.log"


def _run(script, env, *args):
  return subprocess.run(["bash", str(KIT / script), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_create_and_delete_address_the_slice(kit_env):
  env, _, log = kit_env
  assert _run("create.sh", env, "--spot").returncode == 0
  assert _run("delete.sh", env).returncode == 0
  create, delete = log.read_text().splitlines()
  assert create == ("compute tpus tpu-vm create pod1 --zone=us-central2-b --project=proj "
                    "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot")
  assert delete == "compute tpus tpu-vm delete pod1 --zone=us-central2-b --project=proj --quiet"


def test_missing_settings_are_named(kit_env):
  env, _, _ = kit_env
  del env["TPU_NAME"]
  result = _run("run.sh", env, "--", "true")
  assert result.returncode != 0
  assert "TPU_NAME" in result.stderr


def test_run_starts_the_command_on_all_workers_with_its_quoting(kit_env):
  env, home, log = kit_env
  # An argument with spaces and quotes must reach the worker's process intact.
  arg = "--config.data.train_images=/data/my images/it's here"
  result = _run("run.sh", env, "--", sys.executable, "-c",
                "import os, sys; print('ARGS', sys.argv[1:], os.environ.get('MRCNN_FAKE_VENV'))",
                arg)
  assert result.returncode == 0, result.stderr
  assert "--worker=all" in log.read_text()
  train_log = home / "mrcnn_jax_logs" / "train.log"
  for _ in range(100):  # the command runs detached (nohup ... &)
    if train_log.exists() and "ARGS" in train_log.read_text():
      break
    time.sleep(0.1)
  assert f"ARGS [{arg!r}] 1" in train_log.read_text()


def test_logs_and_stop(kit_env):
  env, home, log = kit_env
  assert "nothing running" in _run("stop.sh", env).stdout  # no pid file yet
  assert _run("run.sh", env, "--", sys.executable, "-c",
              "import time; print('step 10/100 loss 1.0', flush=True); time.sleep(60)"
              ).returncode == 0
  pid_file = home / "mrcnn_jax_logs" / "pid"
  train_log = home / "mrcnn_jax_logs" / "train.log"
  for _ in range(100):
    if pid_file.exists() and "step 10" in train_log.read_text():
      break
    time.sleep(0.1)
  result = _run("logs.sh", env, "all", "1")
  assert result.returncode == 0 and "step 10/100 loss 1.0" in result.stdout
  pid = int(pid_file.read_text().split()[0])  # "PID START"
  result = _run("stop.sh", env)
  assert f"sent SIGTERM to {pid}" in result.stdout
  assert "--worker=all" in log.read_text().splitlines()[-1]
  for _ in range(100):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    pytest.fail("the training process survived stop.sh")


def test_run_refuses_while_the_last_run_is_alive_and_takes_an_absolute_log_dir(kit_env,
                                                                              tmp_path):
  """A second run.sh while the first runs would share its workdir and orphan it (stop.sh reads
  the pid file): it must refuse and keep the first run's log. LOG_DIR may be absolute."""
  env, _, _ = kit_env
  env = dict(env, LOG_DIR=str(tmp_path / "abs_logs"))
  logs = pathlib.Path(env["LOG_DIR"])
  first = _run("run.sh", env, "--", sys.executable, "-c",
               "import time; print('first run', flush=True); time.sleep(60)")
  assert first.returncode == 0, first.stderr
  for _ in range(100):
    if (logs / "pid").exists() and "first run" in (logs / "train.log").read_text():
      break
    time.sleep(0.1)
  pid = int((logs / "pid").read_text().split()[0])  # "PID START"
  try:
    second = _run("run.sh", env, "--", sys.executable, "-c", "print('second run')")
    assert second.returncode != 0 and "still going" in second.stderr, second.stderr
    assert int((logs / "pid").read_text().split()[0]) == pid
    assert "first run" in (logs / "train.log").read_text()
    assert "first run" in _run("logs.sh", env, "all", "5").stdout
  finally:
    assert f"sent SIGTERM to {pid}" in _run("stop.sh", env).stdout


def _start_time(pid: int) -> int:
  """Field 22 of /proc/PID/stat (what the kit records), read past the command name."""
  return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_a_pid_file_whose_pid_names_another_process_is_stale(kit_env):
  """The last run ended and its pid went to an unrelated process (a sleep here): run.sh must
  start, and stop.sh must leave that process alone; a pid file with the process's own start
  time is the live run, so the matching is what decides."""
  env, home, _ = kit_env
  logs = home / "mrcnn_jax_logs"
  logs.mkdir()
  pid_file = logs / "pid"
  sleeper = subprocess.Popen(["sleep", "120"])
  try:
    start = _start_time(sleeper.pid)
    # A reused pid (another start time), and a pid file without a start time (an older kit).
    for stale in (f"{sleeper.pid} {start - 1}\n", f"{sleeper.pid}\n"):
      pid_file.write_text(stale)
      result = _run("stop.sh", env)
      assert "nothing running" in result.stdout, result.stdout + result.stderr
      assert sleeper.poll() is None
    result = _run("run.sh", env, "--", sys.executable, "-c",
                  "import time; print('new run', flush=True); time.sleep(60)")
    assert result.returncode == 0, result.stderr
    assert sleeper.poll() is None
    for _ in range(100):
      if "new run" in (logs / "train.log").read_text():
        break
      time.sleep(0.1)
    pid, recorded = map(int, pid_file.read_text().split())
    assert pid != sleeper.pid and recorded == _start_time(pid)
    assert f"sent SIGTERM to {pid}" in _run("stop.sh", env).stdout

    pid_file.write_text(f"{sleeper.pid} {start}\n")  # the matching start time: that run is live
    second = _run("run.sh", env, "--", sys.executable, "-c", "print('second run')")
    assert second.returncode != 0 and f"(pid {sleeper.pid}) is still going" in second.stderr
    assert f"sent SIGTERM to {sleeper.pid}" in _run("stop.sh", env).stdout
    assert sleeper.wait(timeout=10) == -15
  finally:
    if sleeper.poll() is None:
      sleeper.kill()
      sleeper.wait()
