"""SimPO, CPO (+ AlphaPO) and ORPO against float64 NumPy transcriptions of TRL 1.16's
CPOTrainer.cpo_loss / get_batch_loss_metrics and ORPOTrainer.odds_ratio_loss /
get_batch_loss_metrics, on random inputs and on stories260K's log-probs of toy pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import loss as loss_lib
from dpojax import loss_ref_free

from conftest import tiny_config
from method_fixtures import stories_pair_logps


# --- TRL's formulas, float64 ---------------------------------------------------------------
def logsig(x):
  return -np.logaddexp(0.0, -x)


def log1mexp(x):  # TRL's orpo_trainer.log1mexp.
  return np.where(x < -0.6931471805599453, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def trl(d, name, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0, alpha=0.0):
  """{metric: value} of one batch as TRL computes and logs it (real pairs only)."""
  avg = name in ("simpo", "cpo_ipo", "orpo")
  logps = d["pi"] / d["n"] if avg else d["pi"]
  lc, lr = logps[:, 0], logps[:, 1]
  out = {}
  if name == "orpo":
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    ratio = logsig(log_odds)
    losses = beta * ratio
    nll = -d["full"][:, 0].sum() / d["full_n"][:, 0].sum()
    out["loss"] = nll - losses.mean()
    out["preference_loss"] = -losses.mean()
    out["log_odds_ratio"], out["log_odds_chosen"] = ratio.mean(), log_odds.mean()
    rc, rr = beta * lc, beta * lr
  else:
    if alpha != 0.0:
      pc = (1 - np.exp(lc) ** (-alpha)) / alpha
      pr = (1 - np.exp(lr) ** (-alpha)) / alpha
    else:
      pc, pr = lc, lr
    logits = pc - pr
    eps = label_smoothing
    if name == "simpo":
      logits = logits - simpo_gamma / beta
      losses = -logsig(beta * logits) * (1 - eps) - logsig(-beta * logits) * eps
    elif name == "cpo":
      losses = -logsig(beta * logits) * (1 - eps) - logsig(-beta * logits) * eps
    elif name == "cpo_hinge":
      losses = np.maximum(0.0, 1 - beta * logits)
    else:
      losses = (logits - 1 / (2 * beta)) ** 2
    nll = -d["pi"][:, 0].sum() / d["n"][:, 0].sum() if cpo_alpha != 0 else 0.0
    out["loss"] = losses.mean() + cpo_alpha * nll
    out["preference_loss"] = losses.mean()
    rc, rr = beta * pc, beta * pr
  out.update({"nll_loss": nll, "rewards_chosen_mean": rc.mean(),
              "rewards_rejected_mean": rr.mean(), "accuracy": (rc > rr).mean(),
              "rewards_margin_mean": (rc - rr).mean(), "logps_chosen_mean": lc.mean(),
              "logps_rejected_mean": lr.mean()})
  return out


# --- inputs and the loss under test --------------------------------------------------------
def random_inputs(seed=0, p=20, pad=4):
  rng = np.random.default_rng(seed)
  n = rng.integers(1, 30, size=(p, 2)).astype(np.float64)
  pi = -rng.uniform(0.05, 3.0, size=(p, 2)) * n
  full_n = n + rng.integers(3, 10, size=(p, 2))
  full = pi - rng.uniform(1, 20, size=(p, 2))
  d = {"pi": pi, "n": n, "full": full, "full_n": full_n}
  return padded(d, pad)


def padded(d, pad):
  """fp32 arrays with `pad` padding pairs (zeros) after the real ones, and the real f64."""
  f32 = {k: np.concatenate([v, np.zeros((pad, 2))]).astype(np.float32) for k, v in d.items()}
  mask = np.concatenate([np.ones(len(d["pi"])), np.zeros(pad)]).astype(np.float32)
  real = {k: v.astype(np.float32).astype(np.float64) for k, v in d.items()}  # What fp32 saw.
  return f32, mask, real


def ours(f32, mask, cfg):
  stats = loss_lib.PairStats(
      policy_logps=f32["pi"], reference_logps=np.zeros_like(f32["pi"]), counts=f32["n"],
      pair_mask=mask, gt_rewards=None,
      nll_logps=f32["full"] if cfg.nll_over_prompt else None,
      nll_counts=f32["full_n"] if cfg.nll_over_prompt else None)
  n_tok = (f32["full_n"] if cfg.nll_over_prompt else f32["n"])[:, 0] @ mask
  loss, sums = (lambda s: loss_lib.dpo_loss(
      s, cfg, num_pairs=mask.sum(), num_chosen_tokens=n_tok))(stats)
  return float(loss), loss_lib.finalize_metrics(jax.device_get(sums))


CASES = [
    ("simpo", {}), ("simpo", {"label_smoothing": 0.1}), ("simpo", {"cpo_alpha": 0.0}),
    ("simpo", {"alphapo_alpha": 0.25, "simpo_gamma": 1.0, "beta": 2.0}),
    ("cpo", {}), ("cpo", {"label_smoothing": 0.2, "cpo_alpha": 0.5}),
    ("cpo", {"alphapo_alpha": 0.01}), ("cpo", {"alphapo_alpha": -0.05}),
    ("cpo_hinge", {}), ("cpo_ipo", {"beta": 0.5}), ("orpo", {}), ("orpo", {"beta": 0.25}),
]
TRL_NAMES = {"alphapo_alpha": "alpha"}


def check(name, kw, f32, mask, real):
  cfg = config_lib.LossConfig(losses=(name,), weights=(1.0,), **kw)
  loss, metrics = ours(f32, mask, cfg)
  want = trl(real, name, **{TRL_NAMES.get(k, k): v for k, v in kw.items()})
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-6, atol=1e-6)
  for key, value in want.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
  assert metrics["num_pairs"] == len(real["pi"])


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{kw}" for n, kw in CASES])
def test_random_inputs_match_trl(name, kw):
  check(name, kw, *random_inputs(seed=len(kw) + len(name)))


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{kw}" for n, kw in CASES])
def test_stories260k_pairs_match_trl(name, kw):
  check(name, kw, *padded(stories_pair_logps(), pad=3))


def test_gradient_matches_trl_by_finite_differences():
  """d loss / d policy log-probs of SimPO+NLL and ORPO against float64 central differences."""
  f32, mask, real = random_inputs(seed=5, pad=0)
  for name in ("simpo", "orpo"):
    cfg = config_lib.LossConfig(losses=(name,), weights=(1.0,))
    key = "full" if name == "orpo" else "pi"

    def f(pi, nll):
      stats = loss_lib.PairStats(policy_logps=pi, reference_logps=jnp.zeros_like(pi),
                                 counts=f32["n"], pair_mask=mask, nll_logps=nll,
                                 nll_counts=f32["full_n"], policy_plain_logps=nll)
      n_tok = (f32["full_n"] if name == "orpo" else f32["n"])[:, 0].sum()
      return loss_lib.dpo_loss(stats, cfg, num_pairs=mask.sum(), num_chosen_tokens=n_tok)[0]

    nll_in = f32["full"] if name == "orpo" else f32["pi"]
    grad_pi = np.asarray(jax.grad(f)(f32["pi"], nll_in)) + (
        0 if name == "orpo" else np.asarray(jax.grad(f, 1)(f32["pi"], nll_in)))
    h = 1e-5
    for idx in [(0, 0), (3, 1), (7, 0)]:
      up, dn = dict(real), dict(real)
      up["pi"], dn["pi"] = real["pi"].copy(), real["pi"].copy()
      up["pi"][idx] += h
      dn["pi"][idx] -= h
      fd = (trl(up, name)["loss"] - trl(dn, name)["loss"]) / (2 * h)
      np.testing.assert_allclose(grad_pi[idx], fd, rtol=1e-4, atol=1e-6, err_msg=(name, key))


def test_orpo_stays_finite_where_mean_log_prob_is_zero():
  """TRL's log1mexp(0) is -inf; ours is finite (and so is the gradient)."""
  pi = jnp.array([[0.0, -1.0], [-0.5, 0.0]])
  g = jax.grad(lambda x: jnp.sum(loss_ref_free.log_odds(x)))(pi)
  assert np.isfinite(np.asarray(loss_ref_free.log_odds(pi))).all()
  assert np.isfinite(np.asarray(g)).all()


def test_reference_free_methods_need_no_reference():
  for name in ("simpo", "cpo", "cpo_hinge", "cpo_ipo", "orpo"):
    cfg = config_lib.LossConfig(losses=(name,), weights=(1.0,))
    assert cfg.reference_free
    assert config_lib.ReferenceConfig.from_config(
        {"dpo": {"preference_loss": name}, "lora": {"enabled": False}}).mode == "none"
  with pytest.raises(config_lib.ConfigError, match="contradicts reference.mode='copy'"):
    config_lib.ReferenceConfig.from_config(
        {"dpo": {"preference_loss": "orpo"}, "reference": {"mode": "copy"}})


@pytest.mark.parametrize("changes,message", [
    ({"preference_loss": "orpo", "label_smoothing": 0.1}, r"label_smoothing=0.1 has no effect"),
    ({"preference_loss": "simpo", "preference_average_log_probs": True},
     r"preference_average_log_probs=True does not apply to dpo.preference_loss='simpo'"),
    ({"preference_loss": "cpo", "cpo_alpha": -1.0}, r"dpo.cpo_alpha=-1.0 must be finite and >= 0"),
    ({"preference_loss": "simpo", "simpo_gamma": float("nan")}, r"dpo.simpo_gamma=nan must be"),
    ({"preference_loss": "cpo", "sft_loss_weight": 1.0}, r"dpo.sft_loss_weight=1.0 does not"),
])
def test_config_errors_name_the_key(changes, message):
  section = dict(tiny_config().dpo, **changes)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.LossConfig.from_config(section)
