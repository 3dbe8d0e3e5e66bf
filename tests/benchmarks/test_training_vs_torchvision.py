"""The short version of ``scripts/compare_training.py``: our training and torchvision's, from the
same converted weights on the same batches with the same recipe, follow the same learning curve.

One seed, 30 steps (under a minute on two cores). The samplers draw differently on the two
sides, so the curves agree in distribution, not step for step: the first step's losses (same
weights, same batch) agree to the sampling noise, and each loss's mean over the steps after the
warm-up to a band set from its spread over seeds (``_BAND``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrcnn_jax.benchmarks import training_vs_torchvision as tvt

pytestmark = pytest.mark.slow  # two trainings of 30 steps: under a minute on CI's two cores

_RECIPE = tvt.Recipe(steps=30, warmup_steps=10, num_train=60, num_val=1)
_AFTER_WARMUP = slice(_RECIPE.warmup_steps, None)
# Largest |log(ours / torchvision)| of a loss's mean after the warm-up: about twice the largest
# seen over seeds 0-5 (rpn_objectness 0.11, rpn_box 0.10, roi_class 0.27, roi_box 0.08,
# roi_mask 0.09, total 0.12). rpn_objectness is the sharp one: our side at half the learning
# rate reads 0.51 there, without momentum 1.38; the RoI losses wander more in 30 steps.
_BAND = {"rpn_objectness": 0.25, "rpn_box": 0.25, "roi_class": 0.5, "roi_box": 0.5,
         "roi_mask": 0.3, "total_loss": 0.25}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  # One torch thread, as scripts/compare_training.py: two slow down 10-20x on a shared CPU.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    return tvt.run(_RECIPE, seeds=(0,), evaluate=False,
                   data_dir=str(tmp_path_factory.mktemp("shapes")), log=print)
  finally:
    torch.set_num_threads(threads)


def test_same_recipe_on_both_sides(results):
  run = results["runs"][0]
  lr = {fw: np.asarray(run[fw]["losses"]["learning_rate"]) for fw in tvt.FRAMEWORKS}
  np.testing.assert_allclose(lr["jax"], lr["torchvision"], rtol=1e-5)
  assert lr["jax"][0] == pytest.approx(_RECIPE.learning_rate * 0.001)
  assert lr["jax"][-1] == pytest.approx(_RECIPE.learning_rate * 0.01)  # two decays


def test_first_step_losses_agree(results):
  """Step 0: the same weights and batch; only the samplers' draws differ (within 0.4% over
  seeds 0-5 for these three; a loss normalised differently is off by a factor)."""
  run = results["runs"][0]
  for k in ("total_loss", "roi_mask", "rpn_objectness"):
    ours, theirs = run["jax"]["losses"][k][0], run["torchvision"]["losses"][k][0]
    assert ours == pytest.approx(theirs, rel=0.02), k


def test_same_learning_curve(results):
  run = results["runs"][0]
  for fw in tvt.FRAMEWORKS:
    total = run[fw]["losses"]["total_loss"]
    assert np.all(np.isfinite(total)), fw
    # Both learn: 0.25-0.49 of the first step's loss over seeds 0-5.
    assert np.mean(total[-10:]) < 0.6 * total[0], (fw, total)
  for k, band in _BAND.items():
    ours, theirs = (np.mean(run[fw]["losses"][k][_AFTER_WARMUP]) for fw in ("jax", "torchvision"))
    assert abs(np.log(ours / theirs)) <= band, (k, ours, theirs)
