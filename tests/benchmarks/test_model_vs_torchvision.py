"""benchmarks.model_vs_torchvision: the rounds of isolated processes, their medians and paired
ratios, and the table; with a stand-in measuring process (the real ones take minutes)."""

from __future__ import annotations

import sys

import pytest

from mrcnn_jax.benchmarks import model_vs_torchvision as mvt

# Round r (counted in a file) reports JAX train r+1 s and torchvision train 2 s, so the
# per-round ratios are 0.5, 1.0, 1.5, and the flags it was given.
_FAKE = """
import json, sys
counter, args = sys.argv[1], dict(a[2:].split("=", 1) for a in sys.argv[2:])
with open(counter, "a+") as f:
  f.seek(0)
  calls = len(f.read())
  f.write("x")
r = calls // 2
if args["only"] == "jax":
  rows = {"train": [r + 1.0, 2.0 * (r + 1)], "infer_512": [0.5, 1.0], "infer_512_detections": 7}
else:
  rows = {"train": [2.0, 4.0], "infer_512": [1.0, 1.0], "infer_512_detections": 9,
          "device": args["torch_device"]}
print("noise before the tag")
print(%r + json.dumps(rows))
""" % mvt.RESULT_TAG


def test_isolated_takes_medians_over_rounds_and_of_the_paired_ratios(tmp_path):
  script = tmp_path / "fake.py"
  script.write_text(_FAKE)
  logged = []
  options = mvt.Options(repeats=1, threads=1, rounds=3, torch_device="cpu")
  jx, tv, paired = mvt.isolated(options, [sys.executable, str(script), str(tmp_path / "n")],
                                None, logged.append)
  assert len(logged) == 6 and logged[0].startswith("round 1/3 jax:")
  assert jx["train"] == (2.0, 4.0)  # medians over rounds of wall and CPU seconds
  assert tv["train"] == (2.0, 4.0) and tv["device"] == "cpu"
  assert jx["infer_512_detections"] == 7 and tv["infer_512_detections"] == 9
  assert paired["train"] == pytest.approx(1.0)  # median of 0.5, 1.0, 1.5
  assert paired["infer_512"] == pytest.approx(0.5)
  assert "infer_800" not in paired


def test_isolated_skips_torch_and_reports_a_failed_process(tmp_path):
  script = tmp_path / "fake.py"
  script.write_text(_FAKE)
  options = mvt.Options(repeats=1, rounds=1, skip_torch=True, torch_device="cpu")
  jx, tv, paired = mvt.isolated(options, [sys.executable, str(script), str(tmp_path / "n")],
                                None, lambda _: None)
  assert jx["train"] == (1.0, 2.0) and tv == {} and paired == {}
  bad = tmp_path / "bad.py"
  bad.write_text("import sys; sys.exit('no rows')")
  with pytest.raises(RuntimeError, match="failed"):
    mvt.isolated(options, [sys.executable, str(bad)], None, lambda _: None)


def test_format_table_rows_and_ratios():
  jx = {"train": (4.0, 8.0), "infer_512": (1.0, 2.0), "infer_512_plain": (1.5, 3.0),
        "train_compile": (30.0, 31.0), "infer_512_detections": 3}
  tv = {"train": (2.0, 2.0), "infer_512": (2.0, 4.0), "infer_512_full": (4.0, 8.0),
        "infer_512_detections": 5}
  table = mvt.format_table(jx, tv, {"train": 1.9, "infer_512_plain": 0.7})
  lines = table.splitlines()
  assert lines[0].startswith("| measurement | JAX wall s |")
  train = "| train step, batch 2, 512x512 | 4.00 | 2.00 | 2.00 | 1.90 | 8.00 | 2.00 | 4.00 |"
  assert train in lines
  assert any(l.startswith("| inference, batch 1, 512x512 | 1.00 | 2.00 | 0.50 | - |")
             for l in lines)
  assert any("whole call" in l and "| 1.00 | 4.00 | 0.25 |" in l for l in lines)
  assert any("plain jax.jit" in l and "| 1.50 | 2.00 | 0.75 | 0.70 |" in l for l in lines)
  assert "| JAX train compile | 30.00 | - | - | - | 31.00 | - | - |" in lines
  assert "| detections (512) | 3 | 5 | - | - | - | - | - |" in lines
  assert "| detections (800) | - | - | - | - | - | - | - |" in lines
  assert not any(l.startswith("| inference, batch 1, 800x1216") for l in lines)
