"""Expensive test set-up computed once per test session, even under pytest-xdist.

A module fixture runs once per worker that runs one of its tests (and again if pytest tears it
down between them); a multi-process training job or a reference run is too costly for that.
``once(shared, name, produce)`` keeps ``produce()``'s JSON-able result in a folder every worker
shares, behind a file lock: the first caller computes it, the others read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib


def shared_dir(tmp_path_factory, name: str) -> pathlib.Path:
  """A folder of this session shared by every xdist worker (their temporary folders' parent)."""
  root = tmp_path_factory.getbasetemp()
  shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name
  shared.mkdir(exist_ok=True)
  return shared


@contextlib.contextmanager
def locked(path: str):
  with open(path + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def once(shared: pathlib.Path, name: str, produce):
  """``produce()`` (a JSON-able value), computed once per session: workers take turns on a
  file lock; the first computes and stores it, the others read it."""
  path = str(shared / f"{name}.json")
  with locked(path):
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    result = produce()
    with open(path, "w") as f:
      json.dump(result, f)
    return result
