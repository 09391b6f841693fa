"""KTO and APO-zero (unpaired) against a float64 NumPy transcription of TRL 1.16's
KTOTrainer._compute_loss: losses, the clamped no-gradient KL term and the logged metrics, on
random inputs and on stories260K's log-probs of the toy pairs unpaired."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import loss as loss_lib
from dpojax import methods
from dpojax.data import batching
from dpojax.train import build as build_lib

from conftest import tiny_config
from method_fixtures import stories_kto_logps


def sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def trl(d, loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
  """TRL's loss and logged metrics of one batch (real examples only), float64."""
  pi, rho, label = d["pi"], d["rho"], d["label"]
  if loss_type == "kto":
    kl = max((d["pi_kl"] - d["rho_kl"]).mean(), 0.0)  # .mean().detach() ... .clamp(min=0)
  else:
    kl = 0.0
  c_lr, r_lr = (pi - rho)[label], (pi - rho)[~label]
  if loss_type == "kto":
    c_loss, r_loss = 1 - sig(beta * (c_lr - kl)), 1 - sig(beta * (kl - r_lr))
  else:
    c_loss, r_loss = 1 - sig(beta * c_lr), sig(beta * r_lr)
  losses = np.concatenate([desirable_weight * c_loss, undesirable_weight * r_loss])
  out = {"loss": np.nanmean(losses), "kl": kl}
  nc, nr = label.sum(), (~label).sum()
  if nc:
    out["rewards_chosen_mean"] = (beta * c_lr).sum() / nc
    out["logps_chosen_mean"] = pi[label].sum() / nc
  if nr:
    out["rewards_rejected_mean"] = (beta * r_lr).sum() / nr
    out["logps_rejected_mean"] = pi[~label].sum() / nr
  if nc and nr:
    out["rewards_margin_mean"] = out["rewards_chosen_mean"] - out["rewards_rejected_mean"]
  return out


def stats_of(d, pad=3):
  """fp32 PairStats ([:, 0] completion, [:, 1] KL sequence, label as chosen_reward) with
  `pad` padding slots, and the f64 values the fp32 inputs hold."""
  f32 = lambda x: np.concatenate([x, np.zeros(pad)]).astype(np.float32)
  cols = lambda a, b: np.stack([f32(a), f32(b)], 1)
  n = len(d["pi"])
  stats = loss_lib.PairStats(
      policy_logps=cols(d["pi"], d["pi_kl"]), reference_logps=cols(d["rho"], d["rho_kl"]),
      counts=np.ones((n + pad, 2), np.float32),
      pair_mask=np.concatenate([np.ones(n), np.zeros(pad)]).astype(np.float32),
      gt_rewards=cols(d["label"].astype(float), np.zeros(n)))
  real = {k: (v.astype(np.float32).astype(np.float64) if k != "label" else v)
          for k, v in d.items()}
  return stats, real


def random_examples(seed, n=16, labels="mixed", kl_sign=1.0):
  rng = np.random.default_rng(seed)
  rho = -rng.uniform(5, 60, n)
  rho_kl = -rng.uniform(5, 60, n)
  label = {"mixed": rng.random(n) < 0.5, "desirable": np.ones(n, bool),
           "undesirable": np.zeros(n, bool)}[labels]
  if labels == "mixed":
    label[:2] = [True, False]
  return {"pi": rho + rng.normal(0, 4, n), "rho": rho, "label": label,
          "pi_kl": rho_kl + kl_sign * rng.uniform(0.5, 3, n), "rho_kl": rho_kl}


def ours(stats, cfg):
  loss, sums = (lambda s: loss_lib.dpo_loss(
      s, cfg, num_pairs=jnp.sum(s.pair_mask)))(stats)
  return float(loss), loss_lib.finalize_metrics(jax.device_get(sums))


def check(d, loss_type, **kw):
  cfg = config_lib.LossConfig(losses=(loss_type,), weights=(1.0,), **kw)
  stats, real = stats_of(d)
  loss, metrics = ours(stats, cfg)
  want = trl(real, loss_type, **kw)
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-6, atol=1e-7)
  assert {k for k in metrics if k.startswith(("rewards_", "logps_"))} == {
      k for k in want if k.startswith(("rewards_", "logps_"))}
  for key, value in want.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
  assert metrics["num_desirable"] == real["label"].sum()
  assert metrics["num_pairs"] == len(real["label"])
  return metrics


CASES = [("kto", {}), ("kto", {"beta": 0.5}),
         ("kto", {"desirable_weight": 1.33, "undesirable_weight": 0.7}),
         ("apo_zero_unpaired", {}), ("apo_zero_unpaired", {"undesirable_weight": 2.0})]


@pytest.mark.parametrize("labels", ["mixed", "desirable", "undesirable"])
@pytest.mark.parametrize("loss_type,kw", CASES, ids=[f"{n}-{kw}" for n, kw in CASES])
def test_random_batches_match_trl(loss_type, kw, labels):
  check(random_examples(len(kw) + len(labels), labels=labels), loss_type, **kw)


def test_kl_is_clamped_at_zero():
  """KL sequences less likely under the policy than the reference: z0 = 0, not negative."""
  d = random_examples(3, kl_sign=-1.0)
  assert (d["pi_kl"] - d["rho_kl"]).mean() < 0
  assert check(d, "kto")["kl"] == 0.0
  assert check(random_examples(3), "kto")["kl"] > 0.5


@pytest.mark.parametrize("loss_type,kw", [  # The quick loop: the first case of each loss.
    pytest.param(n, kw, id=f"{n}-{kw}", marks=() if not kw else pytest.mark.slow)
    for n, kw in CASES])
def test_stories260k_examples_match_trl(loss_type, kw):
  s = stories_kto_logps()
  rng = np.random.default_rng(0)  # A reference a little off the policy (stories260K itself).
  d = {"pi": s["pi"], "pi_kl": s["pi_kl"], "label": s["label"],
       "rho": s["pi"] + rng.normal(0, 2, len(s["pi"])),
       "rho_kl": s["pi_kl"] + rng.normal(-1, 2, len(s["pi"]))}
  check(d, loss_type, **kw)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_gradient_flows_through_completions_only(loss_type):
  """No gradient into the KL sequences (TRL detaches kl); the completions' gradient equals
  float64 central differences of TRL's loss."""
  d = random_examples(7)
  stats, real = stats_of(d, pad=0)
  cfg = config_lib.LossConfig(losses=(loss_type,), weights=(1.0,))
  grad = np.asarray(jax.grad(lambda pi: loss_lib.dpo_loss(
      stats.replace(policy_logps=pi), cfg, num_pairs=len(d["pi"]))[0])(stats.policy_logps))
  assert (grad[:, 1] == 0).all()
  h = 1e-5
  for i in range(len(d["pi"])):
    up, dn = dict(real, pi=real["pi"].copy()), dict(real, pi=real["pi"].copy())
    up["pi"][i] += h
    dn["pi"][i] -= h
    fd = (trl(up, loss_type)["loss"] - trl(dn, loss_type)["loss"]) / (2 * h)
    np.testing.assert_allclose(grad[i, 0], fd, rtol=1e-4, atol=1e-9)


def test_config():
  cfg = config_lib.LossConfig(losses=("kto",), weights=(1.0,))
  assert not cfg.reference_free and (cfg.desirable_weight, cfg.undesirable_weight) == (1, 1)
  with pytest.raises(config_lib.ConfigError, match="needs a reference"):
    config_lib.LossConfig(losses=("kto",), weights=(1.0,), reference_free=True)
  with pytest.raises(config_lib.ConfigError, match=r"dpo.undesirable_weight=-1.0 must be"):
    config_lib.LossConfig(losses=("kto",), weights=(1.0,), undesirable_weight=-1.0)


def test_run_config_checks():
  config = tiny_config()
  config.dpo.preference_loss = "kto"
  config.train.micro_batch_size = 1
  config.train.global_batch_size = 2
  with pytest.raises(config_lib.ConfigError, match=r"train.micro_batch_size=1 with "
                                                   r"dpo.preference_loss='kto'.* at least 2"):
    config_lib.check_config(config)
  config.data.packing = "batch"  # Batch sizes count pairs here too.
  with pytest.raises(config_lib.ConfigError, match=r"train.micro_batch_size=1 with "):
    config_lib.check_config(config)
  config.data.packing = "first_fit_decreasing"  # Rows: each holds several examples.
  config_lib.check_config(config)


@pytest.mark.parametrize("method, shared", [("sigmoid", True), ("orpo", False)])
def test_share_prompt_applies_where_the_loss_reads_no_prompt(method, shared):
  """ORPO's NLL counts the prompt's tokens on each side: its rows never share the prompt."""
  config = tiny_config()
  config.dpo.preference_loss = method
  config.data.packing, config.data.share_prompt = "batch", True
  _, train_data, _, _ = build_lib.build(config)
  assert train_data.share_prompt == shared
  batch = next(iter(batching.train_dataset(train_data, global_batch_size=8, micro_batch_size=4,
                                           seed=0)))
  assert ("branch_ids" in batch) == shared


def test_weight_advice_is_trls():
  """TRL's bounds: desirable_weight in [nu*uw/nd, 1.33 nu*uw/nd] or undesirable_weight in
  [nd*dw/nu/1.33, nd*dw/nu], each rounded to 2 places."""
  assert methods.weight_warning(100, 100, 1.0, 1.0) is None
  assert methods.weight_warning(100, 300, 3.5, 1.0) is None  # 3.5 in [3.0, 3.99].
  assert methods.weight_warning(100, 300, 1.0, 0.3) is None  # 0.3 in [0.25, 0.33].
  msg = methods.weight_warning(100, 300, 1.0, 1.0)
  assert "dpo.desirable_weight in [3.0, 3.99] OR dpo.undesirable_weight in [0.25, 0.33]" in msg
