"""The ``gcs`` fixture: a Cloud Storage emulator on 127.0.0.1 that every library in the project
is pointed at, for this test session (see :mod:`tests.storage.gcs_server`).

Every variable that could lead a library elsewhere is set or removed: TensorFlow's curl goes
through the loopback proxy, TensorStore to the emulator with a fixed test token, Google's auth
libraries find no credentials file, no gcloud configuration and a metadata server address on
127.0.0.1, so a user's real credentials in the environment are never read. (Where
google-cloud-storage-control is installed, etils ``epath`` asks it once per bucket whether the
bucket is zonal; here that ends at once, on the metadata address, with one logged warning.)
Checked once with ``strace -f -e trace=connect`` over tests/storage: every connect went to
127.0.0.1 (or a local socket).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
import uuid

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_NETGUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netguard")
# Read by the Google auth libraries, gcloud and TensorFlow when looking for credentials.
_CREDENTIAL_VARS = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_OAUTH_ACCESS_TOKEN",
                    "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE", "GOOGLE_API_KEY")


class Gcs:
  """The running emulator: ``env`` for subprocesses, ``new_bucket()`` for a fresh bucket."""

  def __init__(self, emulator_port: int, proxy_port: int, ca: str, state_dir: str):
    self.emulator_url = f"http://127.0.0.1:{emulator_port}"
    self.refused_log = os.path.join(state_dir, "refused.log")
    self.netguard_log = os.path.join(state_dir, "netguard.log")
    proxy = f"http://127.0.0.1:{proxy_port}"
    no_gce = "127.0.0.1:1"  # nothing listens on port 1: a metadata probe fails at once
    self.env = {
        "https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "HTTP_PROXY": proxy,
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": ca,
        "TENSORSTORE_GCS_HTTP_URL": self.emulator_url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "STORAGE_EMULATOR_HOST": self.emulator_url,
        "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": no_gce, "GCE_METADATA_IP": no_gce,
        "GCE_METADATA_ROOT": no_gce,
        "CLOUDSDK_CONFIG": os.path.join(state_dir, "no-gcloud-config"),
        "GOOGLE_CLOUD_PROJECT": "test-project",
        # Child processes log any non-loopback attempt (netguard/sitecustomize.py).
        "MRCNN_TEST_NETGUARD_LOG": self.netguard_log,
        "PYTHONPATH": os.pathsep.join(
            p for p in (_NETGUARD, os.environ.get("PYTHONPATH", "")) if p),
    }

  def new_bucket(self, prefix: str = "bucket") -> str:
    """Creates an empty bucket; returns ``gs://name``."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    request = urllib.request.Request(
        f"{self.emulator_url}/storage/v1/b?project=test-project", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
      pass
    return f"gs://{name}"

  @staticmethod
  def upload(local_dir: str, url: str) -> None:
    """Copies the files under ``local_dir`` to ``url`` (``gs://bucket/prefix``)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # not for every test module
    for folder, _, files in os.walk(local_dir):
      rel = os.path.relpath(folder, local_dir)
      for name in files:
        dst = "/".join([url] + ([] if rel == "." else rel.split(os.sep)) + [name])
        tf.io.gfile.copy(os.path.join(folder, name), dst, overwrite=True)

  def refused(self) -> list[str]:
    """Requests the proxy refused (tunnels to a host other than the storage API), and any
    Python-level attempt, in this process or a child, to reach a non-loopback address."""
    lines = []
    for path in (self.refused_log, self.netguard_log):
      if os.path.exists(path):
        with open(path) as f:
          lines += f.read().splitlines()
    return lines

  def subprocess_env(self) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CREDENTIAL_VARS}
    env.update(self.env)
    return env


_guarded = []


def _guard_this_process() -> None:
  """The children's audit hook in this test process too (once: hooks cannot be removed; it
  records only while ``MRCNN_TEST_NETGUARD_LOG`` is set)."""
  if _guarded:
    return
  spec = importlib.util.spec_from_file_location(
      "_netguard", os.path.join(_NETGUARD, "sitecustomize.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.install()
  _guarded.append(module)


@pytest.fixture(scope="session")
def _gcs_server(tmp_path_factory):
  """The emulator process, one per session (per xdist worker): its ports and CA stay the same
  for the session, as TensorFlow's GCS filesystem, once used, expects."""
  state_dir = str(tmp_path_factory.mktemp("gcs"))
  proc = subprocess.Popen([sys.executable, "-m", "tests.storage.gcs_server", state_dir],
                          cwd=_REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  info = json.loads(proc.stdout.readline())
  server = Gcs(info["emulator_port"], info["proxy_port"], info["ca"], state_dir)
  yield server
  proc.stdin.close()
  proc.wait(timeout=30)
  assert not server.refused(), f"requests to hosts other than the storage API: {server.refused()}"


@pytest.fixture(scope="package")
def gcs(_gcs_server):
  """The emulator, with this process's environment pointing every storage library at it while
  the tests of this folder run (restored after them: other tests never see it)."""
  server = _gcs_server
  saved = {k: os.environ.get(k) for k in (*server.env, *_CREDENTIAL_VARS)}
  _guard_this_process()  # before the variable is set, so that importing it installs nothing
  for k in _CREDENTIAL_VARS:
    os.environ.pop(k, None)
  os.environ.update(server.env)
  yield server
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  assert not server.refused(), f"requests to hosts other than the storage API: {server.refused()}"
