"""The notebooks in ``notebooks/`` run top to bottom, and are committed without outputs.

Each runs in a fresh Jupyter kernel (nbclient) in a temporary working directory, with JAX's
default single CPU device, as a user's notebook would (not the 8 fake devices this session
sets up). The notebooks read ``MRCNN_NOTEBOOK_*`` environment variables for their sizes
(training steps, image counts); the defaults are for people, the values below keep the suite
fast. Each test prints its wall time (``pytest -rP`` or ``-s`` shows it).
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

_NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
_NAMES = sorted(p.name for p in _NOTEBOOKS.glob("*.ipynb"))

# Sizes under test: a few training steps on a handful of images, small stand-in inputs.
_TEST_ENV = {
    "MRCNN_NOTEBOOK_STEPS": "20",
    "MRCNN_NOTEBOOK_NUM_TRAIN": "8",
    "MRCNN_NOTEBOOK_NUM_VAL": "4",
    "MRCNN_NOTEBOOK_PLOT_EVERY": "10",
    "MRCNN_NOTEBOOK_IMAGE_SIZE": "256",
}
_TIMEOUT_S = 600  # per cell


def test_notebooks_exist():
  assert len(_NAMES) == 3, _NAMES


@pytest.mark.parametrize("name", _NAMES)
def test_committed_without_outputs(name):
  nb = nbformat.read(_NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for k, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{name} cell {k} has outputs: clear them before committing "
          "(Jupyter: Edit > Clear Outputs of All Cells)")
  assert "widgets" not in nb.metadata, f"{name}: widget state in the metadata"


@pytest.mark.slow
@pytest.mark.parametrize("name", _NAMES)
def test_notebook_runs(name, tmp_path, record_property):
  nb = nbformat.read(_NOTEBOOKS / name, as_version=4)
  env = dict(os.environ, **_TEST_ENV)
  env.pop("XLA_FLAGS", None)  # one CPU device, as in a user's kernel
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  client = nbclient.NotebookClient(nb, timeout=_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute(env=env)
  seconds = time.perf_counter() - start
  record_property("seconds", round(seconds, 1))
  print(f"{name}: {seconds:.1f} s")
  images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "image/png" in o.get("data", {}))
  assert images >= 1, f"{name} drew no picture"
