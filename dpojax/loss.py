"""The preference losses and their metrics: pure functions of per-sequence log-prob sums.

One `LossConfig` (the `dpo` config section, checked by dpojax.config) selects NeMo-Aligner's
losses (`dpo`, `ipo`, `rpo_sq`, `rpo_bwd_kl`, `rpo_fwd_kl`, plus the SFT term) or TRL's
family (`sigmoid`, `hinge`, `ipo_normalized`, ...) or a weighted list of several.
docs/losses.md has every formula and the system it matches.

Metrics come back as sums (with `num_pairs` and friends), so micro-batches, devices and
validation batches add up exactly; `finalize_metrics` turns them into means once, at logging.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dpojax import loss_kto
from dpojax import loss_ref_free
from dpojax import methods
from dpojax.config import LossConfig

EXP_CLAMP = 80.0  # TRL's clamp of f-divergence exponents in fp32/bf16.

# Metrics that are sums over pairs and become means over `num_pairs` at logging time.
PAIR_MEAN_METRICS = (
    "loss", "preference_loss", "sft_loss", "accuracy", "rewards_chosen_mean",
    "rewards_rejected_mean", "rewards_margin_mean", "logps_chosen_mean", "logps_rejected_mean",
    "log_odds_ratio", "log_odds_chosen")


@flax.struct.dataclass
class PairStats:
  """Per-pair inputs of the loss; [P, 2] arrays hold [:, 0] chosen and [:, 1] rejected.

  policy_logps / reference_logps: summed response log-probs (LD-DPO-weighted sums when
    `ld_alpha` is set; zeros for the reference when reference-free).
  policy_plain_logps: plain sums of the policy (the SFT terms); None = policy_logps.
  counts: response tokens per sequence.
  pair_mask: [P], 1 for real pairs.
  gt_rewards: the data's chosen_reward / rejected_reward (RPO).
  wpo_logps: mean over response tokens of (log p - log sum_v p_v^2), for WPO; no gradient.
  nll_logps / nll_counts: ORPO's NLL sums and token counts over prompt and response; None =
    policy_plain_logps / counts.
  """

  policy_logps: Any
  reference_logps: Any
  counts: Any
  pair_mask: Any
  gt_rewards: Any = None
  policy_plain_logps: Any = None
  wpo_logps: Any = None
  nll_logps: Any = None
  nll_counts: Any = None


def _scores(logratios, cfg: LossConfig):
  """TRL's f-divergence score s(l) of a policy/reference log-ratio l (reverse_kl: l)."""
  kind, alpha = cfg.f_divergence_type, cfg.f_alpha_divergence_coef
  if kind == "forward_kl":  # f'(t) = 1 - 1/t; the exponent clamped like alpha_divergence.
    return 1.0 - jnp.exp(jnp.minimum(-logratios, EXP_CLAMP))
  if kind == "js_divergence":  # f'(t) = log(2t / (t + 1)).
    return math.log(2.0) + jax.nn.log_sigmoid(logratios)
  if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:  # alpha = 1 is reverse_kl.
    t = jnp.minimum((alpha - 1.0) * logratios, EXP_CLAMP)
    return (jnp.exp(t) - 1.0) / (alpha - 1.0)
  return logratios


def _smoothed_sigmoid(z, eps):
  """cDPO: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z); finite for any z."""
  loss = jax.nn.softplus(-z)
  return loss if eps == 0 else (1 - eps) * loss + eps * jax.nn.softplus(z)


def _masked_sort(x_P, mask_P):
  """x sorted ascending over real pairs; padding pairs go last (their values are kept finite)."""
  x_P = jnp.asarray(x_P)
  return x_P[jnp.argsort(jnp.where(mask_P > 0, x_P, jnp.inf))]


class _Terms(NamedTuple):
  """What the pairwise losses are functions of, computed once per micro-batch."""

  stats: PairStats
  cfg: LossConfig
  counts: Any  # [P, 2] response tokens, at least 1.
  pi: Any  # [P, 2] policy statistics (per-token means under preference_average_log_probs).
  rho: Any  # [P, 2] the reference's, likewise.
  lr: Any  # [P, 2] log-ratios pi - rho: the implicit rewards before beta.
  s: Any  # [P, 2] f-divergence scores of lr (lr itself for reverse_kl).
  delta: Any  # [P] s_chosen - s_rejected.
  z: Any  # [P] beta * delta.
  rew: Any  # [P, 2] beta * lr.


def _ipo(t):  # NeMo: delta itself, not beta * delta.
  return (t.delta - 1.0 / (2 * t.cfg.beta)) ** 2


def _norm_delta(t):
  return t.s[:, 0] / t.counts[:, 0] - t.s[:, 1] / t.counts[:, 1]


def _gt_margin(t):
  return t.cfg.gt_reward_scale * (t.stats.gt_rewards[:, 0] - t.stats.gt_rewards[:, 1])


def _rpo_kl(t, forward: bool):
  """rpo_bwd_kl: KL(Bern(sigmoid(g)) || Bern(sigmoid(beta delta))); rpo_fwd_kl the reverse."""
  g = _gt_margin(t)
  lb_c, lb_r = jax.nn.log_sigmoid(t.z), jax.nn.log_sigmoid(-t.z)
  la_c, la_r = jax.nn.log_sigmoid(g), jax.nn.log_sigmoid(-g)
  if forward:
    return jnp.exp(lb_c) * (lb_c - la_c) + jnp.exp(lb_r) * (lb_r - la_r)
  return jnp.exp(la_c) * (la_c - lb_c) + jnp.exp(la_r) * (la_r - lb_r)


def _exo_pair(t):
  z, eps = t.z, t.cfg.label_smoothing
  return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-eps))
          + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - math.log(eps)))


def _robust(t):
  z, eps = t.z, t.cfg.label_smoothing
  return ((1 - eps) * jax.nn.softplus(-z) - eps * jax.nn.softplus(z)) / (1 - 2 * eps)


def _nca_pair(t):
  rew = t.rew
  return (jax.nn.softplus(-rew[:, 0]) + 0.5 * jax.nn.softplus(rew[:, 0])
          + 0.5 * jax.nn.softplus(rew[:, 1]))


def _bco_pair(t):
  rew, base = t.rew, 0.0
  if t.cfg.bco_baseline == "micro_batch_mean":  # Stand-in for TRL <= 0.28's running mean.
    m = t.stats.pair_mask.astype(jnp.float32)
    base = jax.lax.stop_gradient(
        jnp.sum((rew[:, 0] + rew[:, 1]) * m) / jnp.maximum(2 * jnp.sum(m), 1.0))
  return jax.nn.softplus(-(rew[:, 0] - base)) + jax.nn.softplus(rew[:, 1] - base)


def _sorted(t, a, b):
  """AOT: the sorted-difference loss of a and b (padding pairs sort last)."""
  mask = t.stats.pair_mask
  return _smoothed_sigmoid(t.cfg.beta * (_masked_sort(a, mask) - _masked_sort(b, mask)),
                           t.cfg.label_smoothing)


def _discopop(t):
  # (1 - m) * -log sigmoid(z) + m * exp(-z), m = sigmoid(z / tau); m * exp(-z) is taken
  # in log space so that 0 * inf never happens at extreme margins.
  z, tau = t.z, t.cfg.discopop_tau
  return jax.nn.sigmoid(-z / tau) * jax.nn.softplus(-z) + jnp.exp(jax.nn.log_sigmoid(z / tau) - z)


_sigmoid = lambda t: _smoothed_sigmoid(t.z, t.cfg.label_smoothing)
# Per-pair [P] loss of each pairwise entry, by name (docs/losses.md has the formulas).
PAIR_LOSSES = {
    "dpo": _sigmoid,
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "ipo_normalized": lambda t: (_norm_delta(t) - 1.0 / (2 * t.cfg.beta)) ** 2,
    "sigmoid_norm": lambda t: jax.nn.softplus(-t.cfg.beta * _norm_delta(t)),
    "rpo_sq": lambda t: (t.z - _gt_margin(t)) ** 2,
    "rpo_bwd_kl": lambda t: _rpo_kl(t, forward=False),
    "rpo_fwd_kl": lambda t: _rpo_kl(t, forward=True),
    "hinge": lambda t: jax.nn.relu(1.0 - t.z),
    "exo_pair": _exo_pair,
    "robust": _robust,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": lambda t: ((t.lr[:, 0] - 0.5 / t.cfg.beta) ** 2
                            + (t.lr[:, 1] + 0.5 / t.cfg.beta) ** 2),
    "apo_zero": lambda t: jax.nn.sigmoid(-t.rew[:, 0]) + jax.nn.sigmoid(t.rew[:, 1]),
    "apo_down": lambda t: (jax.nn.sigmoid(t.rew[:, 0])
                           + jax.nn.sigmoid(-(t.rew[:, 0] - t.rew[:, 1]))),
    "aot": lambda t: _sorted(t, t.pi[:, 0] - t.pi[:, 1], t.rho[:, 0] - t.rho[:, 1]),
    "aot_unpaired": lambda t: _sorted(t, t.lr[:, 0], t.lr[:, 1]),
    "discopop": _discopop,
}


def pair_losses(stats: PairStats, cfg: LossConfig) -> dict:
  """Per-pair loss [P] of every pairwise entry of `cfg.losses` (not 'sft', a token mean).

  For aot/aot_unpaired, entry i is the loss of the i-th smallest values (real pairs first),
  so only the masked sum is meaningful.
  """
  counts = jnp.maximum(stats.counts, 1.0)
  pi, rho = stats.policy_logps, stats.reference_logps
  if cfg.preference_average_log_probs:
    pi, rho = pi / counts, rho / counts
  lr = pi - rho
  s = _scores(lr, cfg)
  delta = s[:, 0] - s[:, 1]
  terms = _Terms(stats=stats, cfg=cfg, counts=counts, pi=pi, rho=rho, lr=lr, s=s, delta=delta,
                 z=cfg.beta * delta, rew=cfg.beta * lr)
  return {name: PAIR_LOSSES[name](terms) for name in dict.fromkeys(cfg.losses) if name != "sft"}


def dpo_loss(stats: PairStats, cfg: LossConfig, *, num_pairs, num_chosen_tokens=None):
  """The configured loss of one micro-batch, and metric sums.

  Args:
    stats: per-pair log-prob sums and counts of this micro-batch.
    cfg: the loss settings.
    num_pairs: real pairs in the whole global batch, so that the sum of the micro-batch
      losses is the global mean.
    num_chosen_tokens: response tokens of the chosen sequences in the whole global batch
      (only for TRL's token-mean 'sft' entry).

  Returns:
    (loss, metric sums); `finalize_metrics` turns the sums into means.
  """
  if cfg.method in methods.REFERENCE_FREE_LOSSES:  # SimPO, CPO, ORPO.
    return loss_ref_free.method_loss(stats, cfg, num_pairs=num_pairs,
                                     num_nll_tokens=num_chosen_tokens)
  if cfg.method in methods.UNPAIRED_LOSSES:  # KTO: each "pair" is an example + KL sequence.
    return loss_kto.kto_loss(stats, cfg, num_pairs=num_pairs)
  mask = stats.pair_mask.astype(jnp.float32)
  msum = lambda x: jnp.sum(x * mask)
  counts = jnp.maximum(stats.counts, 1.0)
  plain = stats.policy_logps if stats.policy_plain_logps is None else stats.policy_plain_logps

  weight_P = 1.0
  if cfg.use_weighting:  # WPO (TRL 1.16): weight = w_c * w_r, w = exp(mean_t(log p - log sum p^2)).
    weight_P = jax.lax.stop_gradient(jnp.exp(stats.wpo_logps[:, 0] + stats.wpo_logps[:, 1]))
  per_pair = pair_losses(stats, cfg)
  pref_pair = jnp.zeros_like(mask)
  token_pref = jnp.zeros((), jnp.float32)
  for name, w in zip(cfg.losses, cfg.weights):
    if name == "sft":  # TRL: -mean over all chosen response tokens of the batch.
      token_pref = token_pref + w * jnp.sum(-plain[:, 0] * mask)
    else:
      pref_pair = pref_pair + w * weight_P * per_pair[name]

  # NeMo's SFT term: minus the chosen log-prob (summed, or averaged over its tokens).
  sft_pair = -(plain[:, 0] / counts[:, 0] if cfg.sft_average_log_probs else plain[:, 0])
  total_pair = cfg.preference_loss_weight * pref_pair + cfg.sft_loss_weight * sft_pair
  loss = msum(total_pair) / num_pairs
  if cfg.uses_token_sft:
    loss = loss + cfg.preference_loss_weight * token_pref / num_chosen_tokens

  pi, rho = stats.policy_logps, stats.reference_logps
  if cfg.preference_average_log_probs:
    pi, rho = pi / counts, rho / counts
  rewards_Px2 = jax.lax.stop_gradient(cfg.beta * (pi - rho))
  pi = jax.lax.stop_gradient(pi)
  metrics = {
      "loss": msum(jax.lax.stop_gradient(total_pair)),
      "preference_loss": msum(jax.lax.stop_gradient(pref_pair)),
      "sft_loss": msum(jax.lax.stop_gradient(sft_pair)),
      **loss_ref_free.pair_metrics(msum, rewards_Px2, pi, mask),
  }
  if cfg.uses_token_sft:
    token_pref = jax.lax.stop_gradient(token_pref)
    metrics["_token_preference_loss"] = token_pref
    metrics["_token_loss"] = cfg.preference_loss_weight * token_pref
    metrics["_num_chosen_tokens"] = jnp.sum(stats.counts[:, 0] * mask)
  return loss, metrics


def finalize_metrics(sums: dict) -> dict:
  """Metric sums (added over micro-batches, devices, batches) to means, in float64.

  rewards_all_std is the unbiased (N - 1) std over the chosen and rejected rewards of all
  pairs, as NeMo-Aligner's torch.std(cat(chosen, rejected)). Keys starting with '_' are
  internal sums; the others that are not pair means pass through as Python floats.
  """
  sums = dict(sums)
  expert_tokens = sums.pop("_moe_expert_tokens", None)
  sums = {k: float(v) for k, v in sums.items()}
  n = sums.get("num_pairs", 0.0)
  out = {}
  for k, v in sums.items():
    if k.startswith("_"):
      continue
    out[k] = v / max(n, 1.0) if k in PAIR_MEAN_METRICS else v
  if "_num_chosen_tokens" in sums:
    tokens = max(sums["_num_chosen_tokens"], 1.0)
    out["loss"] += sums["_token_loss"] / tokens
    out["preference_loss"] += sums.get("_token_preference_loss", 0.0) / tokens
  if "_kl_batches" in sums:  # KTO's means over desirable / undesirable examples.
    out.update(loss_kto.finalize(sums))
  if "_nll_sum" in sums:  # CPO/ORPO's NLL term, as TRL logs it.
    out["nll_loss"] = sums["_nll_sum"] / max(sums["_num_chosen_tokens"], 1.0)
  if "_moe_forwards" in sums:  # Mixture of experts: per-forward means, per-layer imbalance.
    for k in ("moe_aux_loss", "moe_z_loss"):
      if k in out:
        out[k] /= max(sums["_moe_forwards"], 1.0)
    for i, row in enumerate(np.asarray(expert_tokens, np.float64)):
      if row.sum() > 0:  # Dense layers have none.
        out[f"moe_load_imbalance_layer{i}"] = float(row.max() / row.mean())
  if "_rewards_all_sq" in sums:
    m = 2 * n
    total = sums["rewards_chosen_mean"] + sums["rewards_rejected_mean"]
    mean = total / max(m, 1.0)
    out["rewards_all_mean"] = mean
    var = (sums["_rewards_all_sq"] - m * mean * mean) / (m - 1) if m > 1 else 0.0
    out["rewards_all_std"] = math.sqrt(max(var, 0.0))
  return out
