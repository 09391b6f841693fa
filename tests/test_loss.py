"""Every preference loss against an independent float64 NumPy implementation of its formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import loss as loss_lib

from conftest import tiny_config

PAIRWISE = [n for n in config_lib.LOSSES if n != "sft"]


# --- float64 reference ---------------------------------------------------------------------
def logsig(x):
  return -np.logaddexp(0.0, -x)


def sig(x):
  return np.exp(logsig(x))


def softplus(x):
  return np.logaddexp(0.0, x)


def scores(l, kind, alpha):
  if kind == "forward_kl":
    return 1.0 - np.exp(np.minimum(-l, 80.0))
  if kind == "js_divergence":
    return np.log(2.0) + logsig(l)
  if kind == "alpha_divergence" and abs(alpha - 1) >= 1e-6:
    return (np.exp(np.minimum((alpha - 1) * l, 80.0)) - 1) / (alpha - 1)
  return l


def np_pair_loss(name, d, cfg):
  """Per-pair losses of the real pairs, [n] (aot*: per rank), as written in docs/losses.md."""
  b, eps = cfg.beta, cfg.label_smoothing
  pi, rho, n = d["pi"], d["rho"], np.maximum(d["n"], 1.0)
  if cfg.preference_average_log_probs:
    pi, rho = pi / n, rho / n
  l = pi - rho
  s = scores(l, cfg.f_divergence_type, cfg.f_alpha_divergence_coef)
  delta = s[:, 0] - s[:, 1]
  z = b * delta
  g = cfg.gt_reward_scale * (d["R"][:, 0] - d["R"][:, 1])
  cdpo = lambda x: -(1 - eps) * logsig(x) - eps * logsig(-x)
  if name in ("dpo", "sigmoid"):
    return cdpo(z)
  if name == "ipo":
    return (delta - 1 / (2 * b)) ** 2
  if name == "ipo_normalized":
    return ((s[:, 0] / n[:, 0] - s[:, 1] / n[:, 1]) - 1 / (2 * b)) ** 2
  if name == "sigmoid_norm":
    return -logsig(b * (s[:, 0] / n[:, 0] - s[:, 1] / n[:, 1]))
  if name == "rpo_sq":
    return (z - g) ** 2
  if name in ("rpo_bwd_kl", "rpo_fwd_kl"):
    p, q = sig(g), sig(z)  # Bernoulli(p = data), Bernoulli(q = model).
    lp, l1p, lq, l1q = logsig(g), logsig(-g), logsig(z), logsig(-z)
    if name == "rpo_bwd_kl":
      return p * (lp - lq) + (1 - p) * (l1p - l1q)
    return q * (lq - lp) + (1 - q) * (l1q - l1p)
  if name == "hinge":
    return np.maximum(0.0, 1 - z)
  if name == "exo_pair":
    return sig(z) * (logsig(z) - np.log(1 - eps)) + sig(-z) * (logsig(-z) - np.log(eps))
  if name == "robust":
    return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
  rc, rr = b * l[:, 0], b * l[:, 1]
  if name == "nca_pair":
    return -logsig(rc) - 0.5 * logsig(-rc) - 0.5 * logsig(-rr)
  if name == "bco_pair":
    base = np.concatenate([rc, rr]).mean() if cfg.bco_baseline == "micro_batch_mean" else 0.0
    return -logsig(rc - base) - logsig(-(rr - base))
  if name == "sppo_hard":
    return (l[:, 0] - 0.5 / b) ** 2 + (l[:, 1] + 0.5 / b) ** 2
  if name == "apo_zero":
    return (1 - sig(rc)) + sig(rr)
  if name == "apo_down":
    return sig(rc) + (1 - sig(rc - rr))
  if name == "aot":
    return cdpo(b * (np.sort(pi[:, 0] - pi[:, 1]) - np.sort(rho[:, 0] - rho[:, 1])))
  if name == "aot_unpaired":
    return cdpo(b * (np.sort(l[:, 0]) - np.sort(l[:, 1])))
  if name == "discopop":
    m = sig(z / cfg.discopop_tau)
    # m * exp(-z) as exp(log m - z): the same number, and finite where m underflows.
    return (1 - m) * -logsig(z) + np.exp(logsig(z / cfg.discopop_tau) - z)
  raise KeyError(name)


def np_total(d, cfg):
  """The configured loss over the real pairs: weighted pairwise means + token SFT + NeMo SFT."""
  n = np.maximum(d["n"], 1.0)
  weight = np.exp(d["wpo"].sum(1)) if cfg.use_weighting else 1.0
  pref = 0.0
  for name, w in zip(cfg.losses, cfg.weights):
    if name == "sft":
      pref += w * -d["pi_plain"][:, 0].sum() / d["n"][:, 0].sum()
    else:
      pref += w * np.mean(weight * np_pair_loss(name, d, cfg))
  sft = np.mean(-(d["pi_plain"][:, 0] / n[:, 0] if cfg.sft_average_log_probs
                  else d["pi_plain"][:, 0]))
  return cfg.preference_loss_weight * pref + cfg.sft_loss_weight * sft, pref, sft


# --- inputs --------------------------------------------------------------------------------
def make_inputs(seed=0, p=24, pad=5, spread=3.0, reference_free=False):
  """fp32 inputs with `pad` padding pairs at the end, and their real-pair float64 copies."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 40, size=(p, 2)).astype(np.float32)
  rho = (-rng.uniform(0.5, 3.0, size=(p, 2)) * counts).astype(np.float32)
  pi = (rho + rng.normal(size=(p, 2)) * spread).astype(np.float32)
  if reference_free:
    rho = np.zeros_like(rho)
  plain = (pi - rng.uniform(0, 2, size=(p, 2))).astype(np.float32)  # As if LD-weighted.
  rewards = rng.normal(size=(p, 2)).astype(np.float32) * 2
  wpo = -rng.uniform(0, 1.5, size=(p, 2)).astype(np.float32)
  mask = np.ones(p, np.float32)
  mask[p - pad:] = 0
  counts[p - pad:] = 0  # Padding pairs have no tokens.
  stats = loss_lib.PairStats(
      policy_logps=pi, reference_logps=rho, counts=counts, pair_mask=mask, gt_rewards=rewards,
      policy_plain_logps=plain, wpo_logps=wpo)
  real = slice(0, p - pad)
  f64 = lambda x: x[real].astype(np.float64)
  d = {"pi": f64(pi), "rho": f64(rho), "n": f64(counts), "R": f64(rewards),
       "pi_plain": f64(plain), "wpo": f64(wpo)}
  return stats, d


def run_loss(stats, cfg):
  mask = stats.pair_mask
  return loss_lib.dpo_loss(stats, cfg, num_pairs=jnp.sum(mask),
                           num_chosen_tokens=jnp.sum(stats.counts[:, 0] * mask))


def cfg_for(name, **kw):
  defaults = {"beta": 0.3}
  if name in ("exo_pair", "robust", "aot", "aot_unpaired", "sigmoid"):
    defaults["label_smoothing"] = 0.1
  defaults.update(kw)
  return config_lib.LossConfig(losses=(name,), weights=(1.0,), **defaults)


CASES = [(n, {}) for n in config_lib.LOSSES] + [
    ("dpo", {"preference_average_log_probs": True}),
    ("ipo", {"preference_average_log_probs": True}),
    ("rpo_sq", {"preference_average_log_probs": True, "gt_reward_scale": 0.5}),
    ("rpo_bwd_kl", {"gt_reward_scale": 2.0}),
    ("rpo_fwd_kl", {"gt_reward_scale": 2.0}),
    ("sigmoid", {"label_smoothing": 0.0}),
    ("bco_pair", {"bco_baseline": "micro_batch_mean"}),
    ("dpo", {"reference_free": True}),
    ("sigmoid", {"use_weighting": True}),
    ("nca_pair", {"use_weighting": True}),
    ("dpo", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}),
    ("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("ipo_normalized", {"f_divergence_type": "js_divergence"}),
    ("discopop", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}),
    ("dpo", {"sft_loss_weight": 0.7, "preference_loss_weight": 0.5}),
    ("ipo", {"sft_loss_weight": 0.2, "sft_average_log_probs": True}),
]


def case_id(case):
  name, kw = case
  return name + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_loss_matches_float64_numpy(case):
  name, kw = case
  cfg = cfg_for(name, **kw)
  stats, d = make_inputs(reference_free=cfg.reference_free)
  loss, sums = run_loss(stats, cfg)
  expected, pref, sft = np_total(d, cfg)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)
  means = loss_lib.finalize_metrics(sums)
  np.testing.assert_allclose(means["loss"], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(means["preference_loss"], pref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(means["sft_loss"], sft, rtol=1e-6, atol=1e-6)


def test_multi_loss_list_with_token_sft():
  cfg = config_lib.LossConfig(losses=("sigmoid", "bco_pair", "sft"), weights=(0.8, 0.2, 1.0),
                            beta=0.2, sft_loss_weight=0.1)
  stats, d = make_inputs(seed=3)
  loss, sums = run_loss(stats, cfg)
  expected, _, _ = np_total(d, cfg)
  # The MPO recipe by hand: 0.8 sigmoid + 0.2 bco_pair + token-mean NLL of the chosen.
  by_hand = (0.8 * np.mean(np_pair_loss("sigmoid", d, cfg))
             + 0.2 * np.mean(np_pair_loss("bco_pair", d, cfg))
             - d["pi_plain"][:, 0].sum() / d["n"][:, 0].sum()
             + 0.1 * np.mean(-d["pi_plain"][:, 0]))
  np.testing.assert_allclose(expected, by_hand, rtol=1e-12)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(loss_lib.finalize_metrics(sums)["loss"], expected, rtol=1e-6)


def test_all_losses_at_once_under_jit():
  """Every pairwise loss in one weighted list, jitted (the config is static, arrays traced)."""
  weights = tuple(float(i + 1) / 10 for i in range(len(PAIRWISE)))
  cfg = config_lib.LossConfig(losses=tuple(PAIRWISE), weights=weights, beta=0.3,
                            label_smoothing=0.1)
  stats, d = make_inputs(seed=2)
  loss, sums = jax.jit(run_loss, static_argnums=1)(stats, cfg)
  expected = sum(w * np.mean(np_pair_loss(n, d, cfg)) for n, w in zip(PAIRWISE, weights))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(loss_lib.finalize_metrics(sums)["loss"], expected, rtol=1e-6)


def test_discopop_matches_the_literal_formula_at_moderate_margins():
  cfg = cfg_for("discopop")
  stats, d = make_inputs(spread=0.5)
  z = cfg.beta * ((d["pi"][:, 0] - d["rho"][:, 0]) - (d["pi"][:, 1] - d["rho"][:, 1]))
  m = 1 / (1 + np.exp(-z / cfg.discopop_tau))
  literal = (1 - m) * np.log1p(np.exp(-z)) + m * np.exp(-z)  # TRL 1.16, term by term.
  np.testing.assert_allclose(float(run_loss(stats, cfg)[0]), literal.mean(), rtol=1e-6)


# --- extreme margins -----------------------------------------------------------------------
EXTREME = [(n, {}) for n in PAIRWISE] + [
    ("sigmoid", {"f_divergence_type": f}) for f in config_lib.F_DIVERGENCES[1:]] + [
    ("discopop", {"f_divergence_type": "js_divergence"}),
    ("rpo_fwd_kl", {"preference_average_log_probs": True})]


@pytest.mark.parametrize("case", EXTREME, ids=case_id)
def test_extreme_margins_are_finite_and_exact(case):
  """|delta| = 1e4 in both directions: finite values and gradients, equal to float64."""
  name, kw = case
  cfg = cfg_for(name, beta=0.5, **kw)
  p = 8
  rho = np.full((p, 2), -50.0, np.float32)
  sign = np.where(np.arange(p) % 2, 1.0, -1.0)[:, None]
  pi = (rho + sign * np.array([[5e3, -5e3]])).astype(np.float32)  # delta = +-1e4.
  pi[-1] = rho[-1]  # And one tie.
  counts = np.full((p, 2), 7.0, np.float32)
  rewards = np.tile(np.array([[3.0, -2.0]], np.float32), (p, 1))
  mask = np.ones(p, np.float32)

  def f(pi_):
    stats = loss_lib.PairStats(pi_, rho, counts, mask, rewards, pi_, np.zeros_like(pi))
    return run_loss(stats, cfg)[0]

  value, grad = jax.value_and_grad(f)(pi)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  d = {"pi": pi.astype(np.float64), "rho": rho.astype(np.float64), "n": counts.astype(np.float64),
       "R": rewards.astype(np.float64), "pi_plain": pi.astype(np.float64),
       "wpo": np.zeros((p, 2))}
  np.testing.assert_allclose(float(value), np_total(d, cfg)[0], rtol=1e-6)


# --- gradients by finite differences -------------------------------------------------------
GRAD_CASES = [("dpo", {}), ("ipo", {}), ("rpo_sq", {}), ("rpo_bwd_kl", {}), ("rpo_fwd_kl", {}),
              ("exo_pair", {}), ("discopop", {}), ("aot_unpaired", {}), ("apo_down", {}),
              ("sigmoid", {"f_divergence_type": "js_divergence"}),
              ("dpo", {"sft_loss_weight": 0.5, "preference_average_log_probs": True})]


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradient_matches_finite_differences_of_float64_formula(case):
  name, kw = case
  cfg = cfg_for(name, beta=0.2, **kw)
  stats, d = make_inputs(seed=7, p=10, pad=2, spread=1.0)

  def f(pi):  # The policy log-probs carry the gradient (plain = LD-free sums here).
    return run_loss(stats.replace(policy_logps=pi, policy_plain_logps=pi), cfg)[0]

  grad = np.asarray(jax.grad(f)(stats.policy_logps))
  assert np.all(grad[-2:] == 0)  # Padding pairs get no gradient.
  base = dict(d, pi_plain=d["pi"])
  h = 1e-5
  fd = np.zeros_like(d["pi"])
  for idx in np.ndindex(fd.shape):
    up, down = d["pi"].copy(), d["pi"].copy()
    up[idx] += h
    down[idx] -= h
    fd[idx] = (np_total(dict(base, pi=up, pi_plain=up), cfg)[0]
               - np_total(dict(base, pi=down, pi_plain=down), cfg)[0]) / (2 * h)
  np.testing.assert_allclose(grad[:-2], fd, rtol=2e-4, atol=1e-6)


# --- known values --------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_policy_equal_reference_gives_ln2_and_ipo_quarter_over_beta_squared(beta):
  logps = (np.random.default_rng(1).normal(size=(8, 2)) * 50).astype(np.float32)
  counts = np.full((8, 2), 13.0, np.float32)
  stats = loss_lib.PairStats(logps, logps, counts, np.ones(8, np.float32),
                             np.zeros((8, 2), np.float32))
  value = lambda name: float(run_loss(stats, config_lib.LossConfig(losses=(name,), beta=beta))[0])
  for name in ("dpo", "sigmoid", "sigmoid_norm"):
    assert abs(value(name) - math.log(2)) < 1e-6
  for name in ("ipo", "ipo_normalized"):
    np.testing.assert_allclose(value(name), 1 / (4 * beta ** 2), rtol=1e-6)
  _, sums = run_loss(stats, config_lib.LossConfig(beta=beta))
  means = loss_lib.finalize_metrics(sums)
  assert means["accuracy"] == 0.0  # Ties count as wrong.
  assert means["rewards_margin_mean"] == 0.0 and means["rewards_all_std"] == 0.0


# --- metrics -------------------------------------------------------------------------------
@pytest.mark.parametrize("average", [False, True])
def test_metrics_match_numpy(average):
  cfg = config_lib.LossConfig(beta=0.25, preference_average_log_probs=average)
  stats, d = make_inputs(seed=5, p=32, pad=6)
  means = loss_lib.finalize_metrics(run_loss(stats, cfg)[1])
  n = np.maximum(d["n"], 1)
  pi, rho = (d["pi"] / n, d["rho"] / n) if average else (d["pi"], d["rho"])
  r = 0.25 * (pi - rho)
  every = np.concatenate([r[:, 0], r[:, 1]])
  expected = {
      "accuracy": np.mean(r[:, 0] > r[:, 1]),
      "rewards_chosen_mean": r[:, 0].mean(), "rewards_rejected_mean": r[:, 1].mean(),
      "rewards_margin_mean": (r[:, 0] - r[:, 1]).mean(), "rewards_all_mean": every.mean(),
      "rewards_all_std": every.std(ddof=1),  # Unbiased, as torch.std in NeMo-Aligner.
      "logps_chosen_mean": pi[:, 0].mean(), "logps_rejected_mean": pi[:, 1].mean(),
      "num_pairs": 26}
  for key, value in expected.items():
    np.testing.assert_allclose(means[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  assert not any(k.startswith("_") for k in means)


def test_metric_sums_of_parts_equal_the_whole():
  """Two micro-batches normalised by the global counts add up to the single-batch values."""
  cfg = config_lib.LossConfig(losses=("sigmoid", "sft", "sppo_hard"), weights=(1.0, 0.5, 0.1),
                            beta=0.3, sft_loss_weight=0.2)
  stats, _ = make_inputs(seed=11, p=20, pad=3)
  mask = np.asarray(stats.pair_mask)
  n, tokens = float(mask.sum()), float((np.asarray(stats.counts)[:, 0] * mask).sum())
  whole_loss, whole = loss_lib.dpo_loss(stats, cfg, num_pairs=n, num_chosen_tokens=tokens)
  parts = [loss_lib.dpo_loss(jax.tree.map(lambda x: x[s], stats), cfg, num_pairs=n,
                             num_chosen_tokens=tokens) for s in (slice(0, 7), slice(7, 20))]
  np.testing.assert_allclose(sum(float(l) for l, _ in parts), float(whole_loss), rtol=1e-6)
  summed = jax.tree.map(lambda a, b: a + b, parts[0][1], parts[1][1])
  a, b = loss_lib.finalize_metrics(summed), loss_lib.finalize_metrics(whole)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(b["loss"], float(whole_loss), rtol=1e-6)


# --- config --------------------------------------------------------------------------------
def test_from_config_reads_every_key_of_the_default_section():
  cfg = config_lib.LossConfig.from_config(tiny_config().dpo)
  assert cfg == config_lib.LossConfig()  # The defaults agree: NeMo dpo, beta 0.1, sums.
  c = tiny_config().dpo
  c.ref_policy_kl_penalty = 0.2
  c.preference_loss = "rpo_bwd_kl"
  c.preference_average_log_probs = True
  c.gt_reward_scale = 3
  cfg = config_lib.LossConfig.from_config(c)
  assert (cfg.beta, cfg.losses, cfg.weights, cfg.gt_reward_scale) == (0.2, ("rpo_bwd_kl",),
                                                                      (1.0,), 3.0)
  assert cfg.sft_average_log_probs  # Follows preference_average_log_probs unless set.
  c = tiny_config().dpo
  c.losses = ("sigmoid", "bco_pair", "sft")
  c.loss_weights = (0.8, 0.2, 1)
  cfg = config_lib.LossConfig.from_config(c)
  assert cfg.losses == ("sigmoid", "bco_pair", "sft") and cfg.weights == (0.8, 0.2, 1.0)


@pytest.mark.parametrize("changes,message", [
    ({"preference_loss": "kto_pair"}, r"dpo.preference_loss='kto_pair' is not one of"),
    ({"losses": ("sigmoid", "kto_pair")}, r"dpo.losses\[1\]='kto_pair' is not one of"),
    ({"losses": ("sigmoid", "orpo")}, r"'orpo' is a whole method .* set it alone"),
    ({"preference_loss": "ipo", "beta": 0.0}, r"dpo.beta=0.0 must be positive \(ipo"),
    ({"preference_loss": "ipo", "ref_policy_kl_penalty": -1.0},
     r"dpo.ref_policy_kl_penalty=-1.0 must be positive"),
    ({"beta": 0.5, "ref_policy_kl_penalty": 0.2}, r"set dpo.beta=0.5 or .*ref_policy_kl_penalty"),
    ({"preference_loss": "exo_pair"}, r"dpo.label_smoothing must be > 0 for exo_pair"),
    ({"preference_loss": "robust", "label_smoothing": 0.5},
     r"dpo.label_smoothing=0.5 must be < 0.5"),
    ({"label_smoothing": 0.1, "preference_loss": "ipo"}, r"dpo.label_smoothing=0.1 has no effect"),
    ({"label_smoothing": 1.0}, r"dpo.label_smoothing=1.0 must be in \[0, 1\)"),
    ({"losses": ("sigmoid", "hinge"), "loss_weights": (1.0,)},
     r"dpo.loss_weights has 1 entries but dpo.losses has 2"),
    ({"losses": ("sigmoid",), "loss_weights": (-1.0,)}, r"dpo.loss_weights\[0\]=-1.0 must be"),
    ({"losses": ("sigmoid", "hinge"), "loss_weights": (0.0, 0.0)},
     r"dpo.loss_weights are all zero"),
    ({"losses": ("sigmoid",), "preference_loss": "ipo"}, r"set dpo.preference_loss='ipo' or"),
    ({"preference_loss_weight": 0.0}, r"preference_loss_weight and dpo.sft_loss_weight are both 0"),
    ({"sft_loss_weight": -0.1}, r"dpo.sft_loss_weight=-0.1 must be finite and >= 0"),
    ({"f_divergence_type": "kl"}, r"dpo.f_divergence_type='kl' is not one of"),
    ({"f_divergence_type": "js_divergence", "preference_loss": "rpo_sq"},
     r"dpo.f_divergence_type='js_divergence' only works with .* not \['rpo_sq'\]"),
    ({"use_weighting": True, "preference_loss": "aot"}, r"dpo.use_weighting cannot be combined "
                                                          r"with aot"),
    ({"use_weighting": True, "losses": ("sigmoid", "sft")}, r"dpo.use_weighting cannot be "
                                                              r"combined with 'sft'"),
    ({"ld_alpha": 1.5}, r"dpo.ld_alpha=1.5 must be in \[0, 1\]"),
    ({"ld_alpha": 0.5, "preference_average_log_probs": True}, r"dpo.ld_alpha .* cannot be"),
    ({"preference_loss": "sigmoid_norm", "preference_average_log_probs": True},
     r"dpo.preference_average_log_probs=True with \['sigmoid_norm'\]"),
    ({"discopop_tau": 0.0}, r"dpo.discopop_tau=0.0 must be positive"),
    ({"bco_baseline": "running"}, r"dpo.bco_baseline='running' is not one of"),
    ({"use_weighting": "yes"}, r"dpo.use_weighting='yes' must be of type bool"),
    ({"beta": "0.1"}, r"dpo.beta='0.1' must be of type int/float"),
])
def test_config_errors_name_the_key(changes, message):
  section = dict(tiny_config().dpo, **changes)  # A dict: ConfigDict would refuse wrong types.
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.LossConfig.from_config(section)


def test_unknown_dpo_keys_are_errors():
  with pytest.raises(config_lib.ConfigError, match=r"unknown config keys: \['dpo.betta'\]"):
    config_lib.LossConfig.from_config(dict(tiny_config().dpo, betta=0.1))
