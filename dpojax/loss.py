"""The preference loss and its metrics. Pure functions of per-sequence log-prob sums.

Metrics come back as sums (with `num_pairs`), so micro-batches and devices add up exactly;
`finalize_metrics` turns them into means once, at logging time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Metrics that are per-pair sums and become means over pairs at logging time.
PAIR_MEAN_METRICS = (
    "loss", "accuracy", "rewards_chosen_mean", "rewards_rejected_mean",
    "rewards_margin_mean", "logps_chosen_mean", "logps_rejected_mean")


def dpo_loss(policy_logps_Px2, reference_logps_Px2, pair_mask_P, *, beta: float,
             normalizer):
  """Sigmoid DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).

  Args:
    policy_logps_Px2, reference_logps_Px2: per-sequence log-prob sums, [:, 0] chosen, [:, 1]
      rejected.
    pair_mask_P: 1 for real pairs, 0 for padding pairs.
    beta: the KL penalty (NeMo `ref_policy_kl_penalty`).
    normalizer: the number of real pairs in the whole global batch, so that the sum of the
      micro-batch losses is the global mean.

  Returns:
    (loss, metric sums).
  """
  mask = pair_mask_P.astype(jnp.float32)
  rewards_Px2 = beta * (policy_logps_Px2 - reference_logps_Px2)
  margin_P = rewards_Px2[:, 0] - rewards_Px2[:, 1]
  losses_P = jax.nn.softplus(-margin_P)  # = -log sigmoid(margin), finite for any margin.
  loss = jnp.sum(losses_P * mask) / normalizer
  msum = lambda x: jnp.sum(x * mask)
  metrics = {
      "loss": msum(losses_P),
      "accuracy": msum((rewards_Px2[:, 0] > rewards_Px2[:, 1]).astype(jnp.float32)),
      "rewards_chosen_mean": msum(rewards_Px2[:, 0]),
      "rewards_rejected_mean": msum(rewards_Px2[:, 1]),
      "rewards_margin_mean": msum(margin_P),
      "logps_chosen_mean": msum(policy_logps_Px2[:, 0]),
      "logps_rejected_mean": msum(policy_logps_Px2[:, 1]),
      "num_pairs": jnp.sum(mask),
  }
  return loss, metrics


def finalize_metrics(sums: dict) -> dict:
  """Sums to means over pairs; other entries pass through as Python floats."""
  n = max(float(sums["num_pairs"]), 1.0)
  return {k: float(v) / n if k in PAIR_MEAN_METRICS else float(v) for k, v in sums.items()}
