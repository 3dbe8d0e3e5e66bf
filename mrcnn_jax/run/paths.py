"""Paths that are local or ``gs://`` (any scheme ``tf.io.gfile`` speaks), and the start-up
checks that turn a missing bucket, a missing object or a refused permission into one line.

Files are opened through etils ``epath`` (``tf.io.gfile`` underneath for URLs), checkpoints
through orbax / TensorStore and summaries through ``tf.summary``: all of them read and write
buckets directly, so a workdir or a data set may live in one with no mount::

    python scripts/train.py --config ... --workdir gs://my-bucket/runs/r50

The checks run before any compile: a typo in a bucket name costs seconds, not a compile and a
first step.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Iterator

import tensorflow as tf
from etils import epath

__all__ = ["check_bucket", "check_exists", "check_writable_dir", "is_url", "join",
           "one_line_errors", "resolve"]


def is_url(path) -> bool:
  """``gs://bucket/x`` (or another scheme) rather than a local path."""
  return "://" in str(path)


def resolve(path: str) -> str:
  """A local path made absolute (``~`` expanded); a URL as given, without a trailing ``/``."""
  path = str(path)
  if is_url(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joined for URLs."""
  return posixpath.join(str(path), *parts) if is_url(path) else os.path.join(str(path), *parts)


def _bucket(path: str) -> str:
  scheme, rest = str(path).split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


@contextlib.contextmanager
def one_line_errors(name: str, path: str) -> Iterator[None]:
  """Turns a storage library's error about ``path`` into a one-line Python error naming
  ``name`` (``FileNotFoundError``, ``PermissionError`` or ``OSError``)."""
  try:
    yield
  except tf.errors.PermissionDeniedError as e:
    raise PermissionError(f"{name}: no permission for {path} (check the credentials and the "
                          f"bucket's IAM roles): {_first_line(e)}") from None
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(f"{name} not found: {path} ({_first_line(e)})") from None
  except (tf.errors.OpError, OSError) as e:
    if isinstance(e, (FileNotFoundError, PermissionError)):
      raise
    raise OSError(f"{name}: cannot access {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
  text = getattr(e, "message", None) or str(e) or type(e).__name__
  return text.strip().splitlines()[0]


def check_bucket(name: str, path: str) -> None:
  """``FileNotFoundError`` naming the bucket of the URL ``path`` when it does not exist (a
  listing in it would only say "not found"; a write, fail mid-run); local paths pass."""
  if is_url(path):
    with one_line_errors(name, path):
      if not tf.io.gfile.exists(_bucket(path)):
        raise FileNotFoundError(f"{name}: bucket {_bucket(path)} does not exist ({path})")


def check_exists(name: str, path: str) -> None:
  """Raises one clear line unless ``path`` (a file or a folder) exists and can be read."""
  path = resolve(path)
  check_bucket(name, path)
  with one_line_errors(name, path):
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"{name} not found: {path}")


def check_writable_dir(name: str, path: str) -> str:
  """Creates the folder ``path`` if needed (a bucket's prefix needs no creating, but is
  written to once so that a refused permission shows now); returns it resolved."""
  path = resolve(path)
  check_bucket(name, path)
  with one_line_errors(name, path):
    if epath.Path(path).exists() and not epath.Path(path).is_dir():
      raise ValueError(f"{name} {path} is a file, not a folder")
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  return path
