import numpy as np
import pytest

from dpojax import loss as loss_lib


def np_dpo(pc, pr, rc, rr, beta):
  z = beta * ((pc - rc) - (pr - rr))
  # -log sigmoid(z), evaluated stably in float64.
  return np.where(z > 0, np.log1p(np.exp(-z)), -z + np.log1p(np.exp(z)))


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_dpo_loss_matches_numpy(scale):
  rng = np.random.default_rng(0)
  p = 64
  policy = rng.normal(size=(p, 2)) * scale
  reference = rng.normal(size=(p, 2)) * scale
  beta = 0.3
  mask = np.ones(p)
  mask[-5:] = 0
  loss, metrics = loss_lib.dpo_loss(policy.astype(np.float32), reference.astype(np.float32),
                                    mask.astype(np.float32), beta=beta, normalizer=mask.sum())
  expected = np_dpo(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), (expected * mask).sum() / mask.sum(), rtol=1e-6)
  means = loss_lib.finalize_metrics(metrics)
  rewards = beta * (policy - reference)
  keep = mask > 0
  np.testing.assert_allclose(means["rewards_chosen_mean"], rewards[keep, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(means["rewards_rejected_mean"], rewards[keep, 1].mean(), rtol=1e-5)
  np.testing.assert_allclose(means["rewards_margin_mean"],
                             (rewards[keep, 0] - rewards[keep, 1]).mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(means["logps_chosen_mean"], policy[keep, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(means["logps_rejected_mean"], policy[keep, 1].mean(), rtol=1e-5)
  assert means["accuracy"] == pytest.approx((rewards[keep, 0] > rewards[keep, 1]).mean())
  assert means["num_pairs"] == p - 5


def test_extreme_margins_are_finite_with_exact_gradient():
  import jax
  import jax.numpy as jnp
  policy = jnp.array([[1e4, -1e4], [-1e4, 1e4]], jnp.float32)
  reference = jnp.zeros((2, 2), jnp.float32)
  f = lambda p: loss_lib.dpo_loss(p, reference, jnp.ones(2), beta=1.0, normalizer=2.0)[0]
  value, grad = jax.value_and_grad(f)(policy)
  # Pair 0 is right by 2e4 (loss ~0), pair 1 wrong by 2e4 (loss 2e4, slope -1 per margin unit).
  assert float(value) == pytest.approx(2e4 / 2)
  np.testing.assert_allclose(np.asarray(grad), [[0, 0], [-0.5, 0.5]], atol=1e-6)


def test_equal_policy_and_reference_gives_ln2_and_zero_accuracy():
  logps = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32) * 50
  loss, metrics = loss_lib.dpo_loss(logps, logps, np.ones(8, np.float32), beta=0.1,
                                    normalizer=8.0)
  assert abs(float(loss) - np.log(2)) < 1e-6
  assert loss_lib.finalize_metrics(metrics)["accuracy"] == 0.0  # Ties count as wrong.
