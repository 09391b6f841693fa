"""KTO and APO-zero on unpaired examples: TRL 1.16's `KTOTrainer._compute_loss`.

Each slot of dpojax.loss.PairStats is one example (dpojax.data.unpaired): [:, 0] is its
completion, [:, 1] its KL sequence (the prompt with another example's completion), and
`gt_rewards[:, 0]` its label (1 desirable, 0 undesirable). With l = policy - reference
summed log-prob of the completion and z0 the KL estimate of the micro-batch,

  z0 = max(0, mean over its examples of (policy - reference) of the KL sequences), no gradient
  kto:                desirable 1 - sigmoid(beta (l - z0)), undesirable 1 - sigmoid(beta (z0 - l))
  apo_zero_unpaired:  desirable 1 - sigmoid(beta l),        undesirable sigmoid(beta l)   (z0 = 0)

times dpo.desirable_weight / dpo.undesirable_weight, averaged over all examples of the
global batch. Metrics are sums, as dpojax.loss's; `finalize` turns them into TRL's means
(rewards/logps of the desirable and of the undesirable examples, over their own counts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_estimate(stats, mask):
  """z0 of one micro-batch: the clamped mean KL-sequence log-ratio, without gradient."""
  kl_P = stats.policy_logps[:, 1] - stats.reference_logps[:, 1]
  mean = jnp.sum(kl_P * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def example_losses(stats, cfg, mask):
  """([P] weighted loss of each example, z0, [P] desirable 0/1, [P] log-ratios)."""
  desirable = (stats.gt_rewards[:, 0] > 0.5).astype(jnp.float32)
  logratio = stats.policy_logps[:, 0] - stats.reference_logps[:, 0]
  beta = cfg.beta
  if cfg.method == "kto":
    kl = kl_estimate(stats, mask)
    good = 1.0 - jax.nn.sigmoid(beta * (logratio - kl))
    bad = 1.0 - jax.nn.sigmoid(beta * (kl - logratio))
  else:  # apo_zero_unpaired: no KL term.
    kl = jnp.zeros((), jnp.float32)
    good = 1.0 - jax.nn.sigmoid(beta * logratio)
    bad = jax.nn.sigmoid(beta * logratio)
  per = (cfg.desirable_weight * desirable * good
         + cfg.undesirable_weight * (1.0 - desirable) * bad)
  return per, kl, desirable, logratio


def kto_loss(stats, cfg, *, num_pairs):
  """(loss, metric sums) of one micro-batch; `num_pairs`: the global batch's examples."""
  mask = stats.pair_mask.astype(jnp.float32)
  per, kl, desirable, logratio = example_losses(stats, cfg, mask)
  loss = jnp.sum(per * mask) / num_pairs
  rewards = jax.lax.stop_gradient(cfg.beta * logratio)
  logps = jax.lax.stop_gradient(stats.policy_logps[:, 0])
  good, bad = desirable * mask, (1.0 - desirable) * mask
  metrics = {
      "loss": jnp.sum(jax.lax.stop_gradient(per) * mask),
      "num_pairs": jnp.sum(mask),
      "num_desirable": jnp.sum(good),
      "num_undesirable": jnp.sum(bad),
      "_rewards_desirable": jnp.sum(rewards * good),
      "_rewards_undesirable": jnp.sum(rewards * bad),
      "_logps_desirable": jnp.sum(logps * good),
      "_logps_undesirable": jnp.sum(logps * bad),
      "_kl_sum": kl,
      "_kl_batches": (jnp.sum(mask) > 0).astype(jnp.float32),
  }
  return loss, metrics


def finalize(sums: dict) -> dict:
  """TRL's KTO metrics from the sums: rewards_*/logps_* over the desirable (chosen) and the
  undesirable (rejected) examples, each left out when it has none; kl the mean z0."""
  out = {"kl": sums["_kl_sum"] / max(sums["_kl_batches"], 1.0)}
  n_good, n_bad = sums["num_desirable"], sums["num_undesirable"]
  if n_good > 0:
    out["rewards_chosen_mean"] = sums["_rewards_desirable"] / n_good
    out["logps_chosen_mean"] = sums["_logps_desirable"] / n_good
  if n_bad > 0:
    out["rewards_rejected_mean"] = sums["_rewards_undesirable"] / n_bad
    out["logps_rejected_mean"] = sums["_logps_undesirable"] / n_bad
  if n_good > 0 and n_bad > 0:
    out["rewards_margin_mean"] = out["rewards_chosen_mean"] - out["rewards_rejected_mean"]
  return out
