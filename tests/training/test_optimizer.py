"""Tests for the optimizer and schedule, with torch.optim as the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mrcnn_jax.training import config as config_lib
from mrcnn_jax.training import optimizer as optimizer_lib


def _small_config(**overrides):
  c = config_lib.train_config()
  c.warmup_steps = 10
  c.decay_steps = (30, 40)
  c.batch_size = 8  # peak rate 0.01 by the linear scaling rule
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _params(rng):
  """A pytree shaped like a small detector: convs, dense, biases, norm affines."""
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {
      "stem": {"conv": {"kernel": f(3, 3, 3, 4)}, "norm": {"scale": f(4), "bias": f(4)}},
      "body": {"conv": {"kernel": f(3, 3, 4, 4)}, "gn": {"scale": f(4), "bias": f(4)}},
      "head": {"dense": {"kernel": f(4, 5), "bias": f(5)}},
  }


def _frozen_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) == "stem" for k in path), params)


def test_default_config_schedule_key_steps():
  schedule = optimizer_lib.learning_rate_schedule(config_lib.train_config())
  expected = {0: 0.02 * 0.001, 500: 0.02 * (0.001 + 0.999 * 0.5), 999: 0.02 * (0.001 + 0.999 * 0.999),
              1000: 0.02, 59_999: 0.02, 60_000: 0.002, 79_999: 0.002, 80_000: 0.0002,
              89_999: 0.0002}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, err_msg=f"step {step}")
  # Traced steps give the same values, as inside the jitted train step.
  steps = jnp.asarray(list(expected), jnp.int32)
  np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), list(expected.values()),
                             rtol=1e-5)


def test_peak_rate_scales_linearly_with_batch():
  c = config_lib.train_config()
  assert optimizer_lib.peak_learning_rate(c) == pytest.approx(0.02)
  c.batch_size = 64
  assert optimizer_lib.peak_learning_rate(c) == pytest.approx(0.08)


def test_schedule_matches_torch_linear_warmup_then_multistep():
  c = _small_config()
  schedule = optimizer_lib.learning_rate_schedule(c)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=optimizer_lib.peak_learning_rate(c))
  sched = torch.optim.lr_scheduler.ChainedScheduler([
      torch.optim.lr_scheduler.LinearLR(opt, start_factor=c.warmup_factor,
                                        total_iters=c.warmup_steps),
      torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(c.decay_steps),
                                           gamma=c.decay_factor),
  ])
  for step in range(50):
    np.testing.assert_allclose(float(schedule(step)), opt.param_groups[0]["lr"], rtol=1e-5,
                               err_msg=f"step {step}")
    opt.step()
    sched.step()


def test_weight_decay_mask_skips_biases_and_norms(rng):
  mask = optimizer_lib.weight_decay_mask(_params(rng))
  assert mask["stem"]["conv"]["kernel"] and mask["body"]["conv"]["kernel"]
  assert mask["head"]["dense"]["kernel"]
  assert not mask["stem"]["norm"]["scale"] and not mask["stem"]["norm"]["bias"]
  assert not mask["body"]["gn"]["scale"] and not mask["head"]["dense"]["bias"]


@pytest.mark.parametrize("clip", [0.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_updates_match_torch_sgd(clip, seed):
  """Several steps of our optax chain == torch SGD with decay/no-decay groups and frozen params."""
  rng = np.random.default_rng(seed)
  c = _small_config(grad_clip_norm=clip, weight_decay=0.01)
  params = _params(rng)
  tx = optimizer_lib.make_optimizer(c, trainable_mask=_frozen_mask)
  decay = optimizer_lib.weight_decay_mask(params)
  trainable = _frozen_mask(params)

  flat, treedef = jax.tree.flatten(params)
  t_params = [torch.nn.Parameter(torch.tensor(p)) for p in flat]
  flat_decay, flat_train = jax.tree.leaves(decay), jax.tree.leaves(trainable)
  groups = [
      {"params": [p for p, d, t in zip(t_params, flat_decay, flat_train) if t and d],
       "weight_decay": c.weight_decay},
      {"params": [p for p, d, t in zip(t_params, flat_decay, flat_train) if t and not d],
       "weight_decay": 0.0},
  ]
  opt = torch.optim.SGD(groups, lr=optimizer_lib.peak_learning_rate(c), momentum=c.momentum)
  sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=c.warmup_factor,
                                            total_iters=c.warmup_steps)

  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(6):
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in flat]
    updates, state = update(jax.tree.unflatten(treedef, grads), state, params)
    params = optax.apply_updates(params, updates)

    for p, g, t in zip(t_params, grads, flat_train):
      p.grad = torch.tensor(g) if t else None
    if clip:
      torch.nn.utils.clip_grad_norm_([p for p, t in zip(t_params, flat_train) if t], clip)
    opt.step()
    sched.step()

  for ours, theirs in zip(jax.tree.leaves(params), t_params):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_frozen_params_get_zero_update_and_no_state(rng):
  c = _small_config()
  params = _params(rng)
  tx = optimizer_lib.make_optimizer(c, trainable_mask=_frozen_mask)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: np.ones_like(p), params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves(updates["stem"]):
      np.testing.assert_array_equal(leaf, 0.0)
    assert all(np.all(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(updates["body"]))
  # Momentum buffers exist for the trainable leaves only (frozen ones are optax MaskedNodes).
  n_trainable = len(jax.tree.leaves(params["body"])) + len(jax.tree.leaves(params["head"]))
  buffers = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert len(buffers) == n_trainable
