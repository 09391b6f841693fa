"""SimPO, CPO and ORPO: the reference-free methods' losses and metrics (TRL 1.16's
`experimental.cpo.CPOTrainer.cpo_loss` and `experimental.orpo.ORPOTrainer.odds_ratio_loss`).

Pure functions of the policy's per-sequence statistics (dpojax.loss.PairStats: the reference
fields are ignored; the step runs no reference at all for these). Like dpojax.loss, metrics
come back as sums; the NLL term is a token mean over the whole global batch (`_nll_sum` /
`_num_chosen_tokens`), added once by `loss.finalize_metrics`. docs/losses.md has the formulas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax import methods

EXP_CLAMP = 80.0  # AlphaPO's exponent is clamped like dpojax.loss's f-divergence ones.
# The largest mean log-prob log1mexp takes: TRL's log(-expm1(0)) is -inf; ours stays finite.
_LOG1MEXP_MAX = -1e-30


def _cdpo(z, eps):
  loss = jax.nn.softplus(-z)
  return loss if eps == 0 else (1 - eps) * loss + eps * jax.nn.softplus(z)


def log1mexp(x):
  """log(1 - e^x) for x < 0, branching at -log 2 as TRL's ORPO (no cancellation)."""
  t = -0.6931471805599453
  x = jnp.minimum(x, _LOG1MEXP_MAX)
  low = x < t  # Each branch sees inputs of its own side only, so no inf * 0 in the gradient.
  return jnp.where(low, jnp.log1p(-jnp.exp(jnp.where(low, x, t))),
                   jnp.log(-jnp.expm1(jnp.where(low, t, x))))


def policy_logps(stats, cfg):
  """[P, 2] log-probs as TRL's trainer compares them: means over the response tokens for
  simpo, cpo_ipo and orpo (TRL's average_log_prob=True), sums otherwise."""
  pi = stats.policy_logps
  if cfg.method in methods.AVERAGED_LOSSES:
    pi = pi / jnp.maximum(stats.counts, 1.0)
  return pi


def shaped(logps, alpha: float):
  """AlphaPO's reward r = (1 - p^-alpha) / alpha = (1 - e^(-alpha logp)) / alpha; logp at 0."""
  if alpha == 0:
    return logps
  return (1.0 - jnp.exp(jnp.minimum(-alpha * logps, EXP_CLAMP))) / alpha


def log_odds(pi_Px2):
  """ORPO's log odds ratio log(odds_c / odds_r), odds = p / (1 - p) of the mean log-prob."""
  return (pi_Px2[:, 0] - pi_Px2[:, 1]) - (log1mexp(pi_Px2[:, 0]) - log1mexp(pi_Px2[:, 1]))


def pair_loss(stats, cfg):
  """[P] preference loss of each pair (without the NLL term) and the [P, 2] rewards."""
  name, beta, pi = cfg.method, cfg.beta, policy_logps(stats, cfg)
  if name == "orpo":
    return -beta * jax.nn.log_sigmoid(log_odds(pi)), beta * pi
  r = shaped(pi, cfg.alphapo_alpha)
  logits = r[:, 0] - r[:, 1]
  if name == "simpo":  # beta * (logits - gamma / beta).
    loss = _cdpo(beta * logits - cfg.simpo_gamma, cfg.label_smoothing)
  elif name == "cpo":
    loss = _cdpo(beta * logits, cfg.label_smoothing)
  elif name == "cpo_hinge":
    loss = jax.nn.relu(1.0 - beta * logits)
  else:  # cpo_ipo
    loss = (logits - 1.0 / (2 * beta)) ** 2
  return loss, beta * r


def pair_metrics(msum, rewards_Px2, pi_Px2, mask_P) -> dict:
  """The reward and log-prob metric sums every pairwise loss logs (no gradient in)."""
  return {
      "accuracy": msum((rewards_Px2[:, 0] > rewards_Px2[:, 1]).astype(jnp.float32)),
      "rewards_chosen_mean": msum(rewards_Px2[:, 0]),
      "rewards_rejected_mean": msum(rewards_Px2[:, 1]),
      "rewards_margin_mean": msum(rewards_Px2[:, 0] - rewards_Px2[:, 1]),
      "_rewards_all_sq": msum(rewards_Px2[:, 0] ** 2 + rewards_Px2[:, 1] ** 2),
      "logps_chosen_mean": msum(pi_Px2[:, 0]),
      "logps_rejected_mean": msum(pi_Px2[:, 1]),
      "num_pairs": jnp.sum(mask_P),
  }


def method_loss(stats, cfg, *, num_pairs, num_nll_tokens=None):
  """(loss, metric sums) of one micro-batch: mean preference loss over the global batch's
  pairs plus the weighted NLL token mean (cpo_alpha; 1 for ORPO)."""
  mask = stats.pair_mask.astype(jnp.float32)
  msum = lambda x: jnp.sum(x * mask)
  pair_P, rewards_Px2 = pair_loss(stats, cfg)
  loss = msum(pair_P) / num_pairs
  nll_weight = 1.0 if cfg.method == "orpo" else cfg.cpo_alpha
  pi = jax.lax.stop_gradient(policy_logps(stats, cfg))
  rewards_Px2 = jax.lax.stop_gradient(rewards_Px2)
  plain = stats.policy_logps if stats.policy_plain_logps is None else stats.policy_plain_logps
  metrics = {
      "loss": msum(jax.lax.stop_gradient(pair_P)),
      "preference_loss": msum(jax.lax.stop_gradient(pair_P)),
      "sft_loss": msum(-jax.lax.stop_gradient(plain[:, 0])),
      **pair_metrics(msum, rewards_Px2, pi, mask),
  }
  if cfg.method == "orpo":
    odds_P = log_odds(pi)
    metrics["log_odds_ratio"] = msum(jax.nn.log_sigmoid(odds_P))
    metrics["log_odds_chosen"] = msum(odds_P)
  if nll_weight:
    # CPO: the chosen response's tokens; ORPO: its prompt and response (stats.nll_logps).
    nll = stats.nll_logps if stats.nll_logps is not None else plain
    nll_sum = jnp.sum(-nll[:, 0] * mask)
    loss = loss + nll_weight * nll_sum / num_nll_tokens
    nll_counts = stats.nll_counts if stats.nll_counts is not None else stats.counts
    metrics["_nll_sum"] = jax.lax.stop_gradient(nll_sum)
    metrics["_token_loss"] = nll_weight * metrics["_nll_sum"]
    metrics["_num_chosen_tokens"] = jnp.sum(nll_counts[:, 0] * mask)
  else:  # TRL logs nll_loss 0 when cpo_alpha = 0.
    metrics["nll_loss"] = jnp.zeros((), jnp.float32)
  return loss, metrics
