"""``mrcnn_jax.run.paths`` against the emulator: each way a bucket path can be wrong is its own
one-line error naming the field and the path."""

import pytest
from etils import epath

from mrcnn_jax.run import paths


def test_resolve_and_join_keep_urls_and_anchor_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("gs://b/run/") == "gs://b/run"
  assert paths.resolve("run") == str(tmp_path / "run")
  assert paths.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
  assert paths.join(str(tmp_path), "x") == str(tmp_path / "x")


@pytest.mark.parametrize("path, error, message", [
    ("gs://missing-bucket-p/a.json", FileNotFoundError,
     "field: bucket gs://missing-bucket-p does not exist (gs://missing-bucket-p/a.json)"),
    ("{bucket}/missing.json", FileNotFoundError, "field not found: {bucket}/missing.json"),
    ("gs://no-access-p/a.json", PermissionError, "field: no permission for gs://no-access-p/a.json"),
])
def test_check_exists_names_what_is_wrong(gcs, path, error, message):
  bucket = gcs.new_bucket()
  with pytest.raises(error) as info:
    paths.check_exists("field", path.format(bucket=bucket))
  assert str(info.value).startswith(message.format(bucket=bucket))
  assert "\n" not in str(info.value)


def test_check_writable_dir(gcs):
  bucket = gcs.new_bucket()
  assert paths.check_writable_dir("workdir", f"{bucket}/run/") == f"{bucket}/run"
  paths.check_exists("workdir", f"{bucket}/run")
  (epath.Path(bucket) / "file").write_text("x")
  with pytest.raises(ValueError, match=r"^workdir gs://\S+/file is a file, not a folder$"):
    paths.check_writable_dir("workdir", f"{bucket}/file")
  with pytest.raises(PermissionError, match=r"^workdir: no permission for gs://no-access-w/run"):
    paths.check_writable_dir("workdir", "gs://no-access-w/run")
