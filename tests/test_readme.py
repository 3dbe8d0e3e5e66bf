"""The README's notebook snippets run as written (issue 3: "initialised, trained one step and
run for inference from a notebook in a few lines shown in the README").

They run in a fresh process with JAX's default single CPU device, as in a notebook: this test
session fakes 8 devices (conftest), over which the snippet's global batch of 2 would not split.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# What the snippets must have produced, checked after they ran (names as the README uses them).
_CHECKS = """
import numpy as np
assert crops.shape == (1, 1, 7, 7, 256), crops.shape
assert np.asarray(keep).tolist() == [0] + [-1] * 9, keep
b = config.train.batch_size
for out in (detections, model.apply(state.variables(), batch["image"],
                                    method=modeling.MaskRCNN.predict)):
  n = out["boxes"].shape[1]
  assert out["boxes"].shape == (b, n, 4) and out["masks"].shape == (b, n, 28, 28), out
  assert out["valid"].dtype == bool and out["scores"].shape == (b, n)
for name, value in metrics.items():
  assert np.all(np.isfinite(np.asarray(value))), (name, value)
assert int(state.step) == 1, state.step
print("README snippets OK")
"""


def _python_blocks(text: str):
  return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.slow
def test_readme_snippets_run(tmp_path):
  blocks = _python_blocks(_README.read_text())
  assert any("roi_align" in b for b in blocks) and any("make_train_step" in b for b in blocks), (
      f"the README's ops and model snippets are gone ({len(blocks)} python blocks)")
  # The data set goes under this test's directory instead of /tmp/shapes.
  code = "\n".join(blocks).replace('"/tmp/shapes"', repr(str(tmp_path / "shapes")))
  assert str(tmp_path) in code, "the model snippet no longer writes its data set to /tmp/shapes"
  script = tmp_path / "snippets.py"
  script.write_text(code + _CHECKS)
  # JAX's default single device (no XLA_FLAGS), as the other subprocess tests run scripts.
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "README snippets OK" in proc.stdout
