"""The loss plumbing of the train step: per-sequence statistics (LD-DPO, WPO), exact
reductions over micro-batches, and short trainings with each NeMo loss."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax.data import batching, pipeline
from dpojax.data.tokenize import Tokenizer
from dpojax.train import logps as logps_lib
from dpojax.train import step as step_lib

from conftest import tiny_config

SEQ_LEN = 48


@pytest.fixture(scope="module")
def tiny_model():
  mcfg = model_lib.ModelConfig.from_dict(tiny_config().model)
  return mcfg, model_lib.init_params(mcfg, jax.random.key(0))


# --- per-sequence statistics ---------------------------------------------------------------
def packed_micro(rng, vocab):
  """Two rows holding 3 pairs' 6 sequences back to back (a pair may straddle rows)."""
  layout = [[(0, 7, 3), (1, 10, 3), (2, 6, 2)], [(3, 5, 2), (4, 9, 4), (5, 4, 1)]]
  rows, t = len(layout), 40
  micro = {k: np.zeros((rows, t), np.int32) for k in pipeline.BATCH_KEYS}
  micro["sequence_ids"][:] = -1
  micro["tokens"] = rng.integers(0, vocab, size=(rows, t)).astype(np.int32)
  for r, seqs in enumerate(layout):
    pos = 0
    for seg, (seq, length, prompt) in enumerate(seqs, start=1):
      sl = slice(pos, pos + length)
      micro["segment_ids"][r, sl] = seg
      micro["positions"][r, sl] = np.arange(length)
      micro["sequence_ids"][r, sl] = seq
      micro["loss_mask"][r, pos + prompt:pos + length] = 1
      pos += length
  micro["pair_mask"] = np.ones(3, np.float32)
  micro["chosen_reward"] = np.ones(3, np.float32)
  micro["rejected_reward"] = np.zeros(3, np.float32)
  return micro


def naive_stats(logits, micro, alpha):
  """Loops over tokens in float64: sums, counts, LD-DPO sums and WPO means per sequence."""
  tokens, seg, lmask, seq_ids = (micro[k] for k in ("tokens", "segment_ids", "loss_mask",
                                                    "sequence_ids"))
  per_seq = {s: [] for s in range(6)}  # (log p, log sum p^2) of each response token, in order.
  for r in range(tokens.shape[0]):
    for j in range(1, tokens.shape[1]):
      if lmask[r, j] and seg[r, j] and seg[r, j] == seg[r, j - 1]:
        row = logits[r, j - 1].astype(np.float64)
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        per_seq[seq_ids[r, j]].append((logp[tokens[r, j]], np.log(np.exp(2 * logp).sum())))
  counts = np.array([len(per_seq[s]) for s in range(6)], np.float64)
  sums = np.array([sum(lp for lp, _ in per_seq[s]) for s in range(6)])
  ld, wpo = np.zeros(6), np.zeros(6)
  for s in range(6):
    shared = min(counts[2 * (s // 2)], counts[2 * (s // 2) + 1])
    ld[s] = sum(lp * (1.0 if k < shared else alpha) for k, (lp, _) in enumerate(per_seq[s]))
    wpo[s] = np.mean([lp - lsq for lp, lsq in per_seq[s]])
  return {"logps": sums, "counts": counts, "ld_logps": ld, "wpo_logps": wpo}


def test_sequence_stats_ld_dpo_and_wpo_match_token_loops_on_packed_rows(tiny_model):
  mcfg, params = tiny_model
  micro = packed_micro(np.random.default_rng(0), mcfg.vocab_size)
  cfg = step_lib.StepConfig(model=mcfg, loss=config_lib.LossConfig(ld_alpha=0.3,
                                                                use_weighting=True))

  @jax.jit
  def run(params, micro):
    hidden = model_lib.apply(params, mcfg, micro["tokens"], micro["positions"],
                             micro["segment_ids"])
    logits = jnp.einsum("btd,vd->btv", hidden, model_lib.output_weight(params, mcfg))
    return logps_lib.sequence_logps(params, micro, cfg), logits

  stats, logits = run(params, micro)
  expected = naive_stats(np.asarray(logits), micro, alpha=0.3)
  assert list(expected["counts"]) == [4, 7, 4, 3, 5, 3]
  assert expected["ld_logps"][1] != expected["logps"][1]  # The tail is really down-weighted.
  for key, value in expected.items():
    np.testing.assert_allclose(np.asarray(stats[key]).reshape(-1), value, rtol=1e-5, atol=1e-5,
                               err_msg=key)


def test_step_config_keeps_the_beta_shortcut():
  mcfg = model_lib.ModelConfig()
  assert step_lib.StepConfig(model=mcfg, beta=0.2).loss == config_lib.LossConfig(beta=0.2)
  assert step_lib.StepConfig(model=mcfg).loss == config_lib.LossConfig()
  with pytest.raises(ValueError, match="beta=0.3 disagrees with loss.beta=0.1"):
    step_lib.StepConfig(model=mcfg, loss=config_lib.LossConfig(), beta=0.3)


# --- data with reward fields ---------------------------------------------------------------
def write_pairs(path, source, n):
  """The first `n` short records of `source`; rewards on 2 of every 3 (the rest: defaults)."""
  records = []
  with open(source) as f:
    for line in f:
      r = json.loads(line)
      if len(r["prompt"]) + max(len(r["chosen_response"]), len(r["rejected_response"])) < 60:
        records.append(r)
      if len(records) == n:
        break
  for i, r in enumerate(records):
    if i % 3:
      r["chosen_reward"], r["rejected_reward"] = 1.0 + i % 4, -0.5 * (i % 2)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """48 train and 24 val toy pairs with chosen_reward / rejected_reward fields."""
  c = tiny_config()
  tmp = tmp_path_factory.mktemp("rewards")
  tok = Tokenizer(c.data.tokenizer_path)
  opts = pipeline.DataOptions(max_seq_length=SEQ_LEN)
  out = {}
  for split, source, n in (("train", c.data.train_path, 48), ("val", c.data.val_path, 24)):
    path = str(tmp / f"{split}.jsonl")
    records = write_pairs(path, source, n)
    out[split] = pipeline.PreferenceData(path, tok, opts)
    assert len(out[split]) == n  # Nothing dropped: batches follow the file.
    out[split + "_gt"] = np.array([[r.get("chosen_reward", 1.0), r.get("rejected_reward", 0.0)]
                                   for r in records])
  return out


# --- learning-rate schedules -----------------------------------------------------------------
def _hf_linear(step, peak, warmup, total):
  """transformers.get_linear_schedule_with_warmup's lr_lambda (TRL's default), times peak."""
  if step < warmup:
    return peak * step / max(1, warmup)
  return peak * max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize("warmup", [0, 4])
def test_linear_schedule_is_trl_warmup_then_decay_to_zero(warmup):
  train = tiny_config().train
  train.lr_schedule, train.learning_rate, train.max_steps, train.warmup_steps = (
      "linear", 5e-4, 20, warmup)
  schedule = step_lib.make_schedule(train)
  got = [float(schedule(s)) for s in range(23)]
  np.testing.assert_allclose(got, [_hf_linear(s, 5e-4, warmup, 20) for s in range(23)],
                             rtol=1e-6, atol=1e-12)
  assert got[20] == 0.0 and max(got) == pytest.approx(5e-4)
  # And the optimizer applies it: AdamW's first update is -lr * sign-ish(g) = -lr exactly for
  # a constant gradient with eps -> 0 and no decay.
  train.adam_eps, train.grad_clip, train.weight_decay = 1e-30, 0.0, 0.0
  tx, _ = step_lib.make_optimizer(train)
  params = {"w": jnp.zeros(3)}
  opt_state = tx.init(params)
  for s in range(6):
    update, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
    np.testing.assert_allclose(update["w"], -_hf_linear(s, 5e-4, warmup, 20), rtol=1e-5)


def test_schedules_cosine_default_constant_and_errors():
  train = tiny_config().train
  train.learning_rate, train.max_steps, train.warmup_steps, train.min_lr_ratio = 1e-3, 12, 2, 0.1
  cosine = step_lib.make_schedule(train)  # The default; also for configs without the key.
  del train["lr_schedule"]
  old = step_lib.make_schedule(train)
  for s in range(14):
    c = 1e-3 * s / 2 if s < 2 else 1e-4 + 0.5 * (1e-3 - 1e-4) * (
        1 + math.cos(math.pi * min(s - 2, 10) / 10))
    assert float(cosine(s)) == pytest.approx(c, rel=1e-5) == float(old(s))
  train.lr_schedule = "constant"
  constant = step_lib.make_schedule(train)
  assert [float(constant(s)) for s in range(5)] == pytest.approx([0, 5e-4, 1e-3, 1e-3, 1e-3])
  train.lr_schedule = "step"
  with pytest.raises(ValueError, match=r"train.lr_schedule='step' is not one of"):
    step_lib.make_optimizer(train)


# --- exact reductions ----------------------------------------------------------------------
@pytest.mark.slow
def test_micro_batches_equal_one_big_batch_for_a_rich_loss(data, tiny_model):
  """micro_batch_size 8 vs 2 (with a padding pair): same update and same metrics."""
  mcfg, params = tiny_model
  loss_cfg = config_lib.LossConfig(
      losses=("dpo", "sft", "rpo_bwd_kl"), weights=(1.0, 0.5, 0.3), beta=0.2,
      sft_loss_weight=0.2, ld_alpha=0.5, gt_reward_scale=0.7)
  cfg = step_lib.StepConfig(model=mcfg, loss=loss_cfg)
  pairs = [data["train"][i] for i in range(7)] + [None]
  ref = jax.tree.map(jnp.copy, params)
  train = tiny_config().train
  tx, schedule = step_lib.make_optimizer(train)
  results = []
  for micro in (8, 2):
    batch = batching.collate(pairs, micro_batch_size=micro, seq_len=SEQ_LEN,
                             opts=data["train"].opts)
    step = jax.jit(lambda s, r, b: step_lib.train_step(s, r, b, cfg=cfg, tx=tx,
                                                       schedule=schedule))
    state = step_lib.init_state(params, tx)
    for _ in range(3):  # Warmup: lr is 0 at step 0, so step 3 has policy != reference.
      state, metrics = step(state, ref, batch)
    results.append((state, loss_lib.finalize_metrics(jax.device_get(metrics))))
  (s8, m8), (s2, m2) = results
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), s8.params, s2.params)
  assert m8.keys() == m2.keys()
  for key in m8:
    np.testing.assert_allclose(m8[key], m2[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert m8["num_pairs"] == 7 and m8["rewards_all_std"] > 0 and m8["sft_loss"] > 0
  expected_keys = {"loss", "preference_loss", "sft_loss", "accuracy", "rewards_chosen_mean",
                   "rewards_rejected_mean", "rewards_margin_mean", "rewards_all_mean",
                   "rewards_all_std", "logps_chosen_mean", "logps_rejected_mean", "num_pairs",
                   "tokens", "grad_norm", "learning_rate"}
  assert set(m8) == expected_keys


# --- each NeMo loss trains -----------------------------------------------------------------
@pytest.mark.slow
def test_each_nemo_loss_trains_and_reads_rewards_from_the_jsonl(data, tiny_model):
  """dpo, ipo, rpo_sq, rpo_fwd_kl, rpo_bwd_kl: 30 Adam steps on 48 pairs raise val accuracy.

  The model compiles once: the gradient is the step's chain rule, the vector-Jacobian
  product of the per-sequence log-probs with d loss / d log-probs (the only path from the
  parameters to any of these losses); only that small loss gradient compiles per loss.
  """
  mcfg, params0 = tiny_model
  base = step_lib.StepConfig(model=mcfg)
  stats_fn = jax.jit(lambda p, m: logps_lib.sequence_logps(p, m, base))
  vjp_fn = jax.jit(lambda p, m, cot: jax.vjp(
      lambda q: logps_lib.sequence_logps(q, m, base)["logps"], p)[1](cot)[0])
  train_cfg = tiny_config().train
  train_cfg.learning_rate, train_cfg.max_steps, train_cfg.warmup_steps = 3e-3, 30, 3
  tx, _ = step_lib.make_optimizer(train_cfg)
  update_fn = jax.jit(lambda p, o, g: (lambda u, o2: (jax.tree.map(jnp.add, p, u), o2))(
      *tx.update(g, o, p)))

  micros = lambda split, g: [jax.tree.map(lambda x: x[0], b) for b in batching.eval_batches(
      data[split], global_batch_size=g, micro_batch_size=g)]
  train_micros, val_micros = micros("train", 8), micros("val", 8)  # One shape: one compile.
  ref_train = [stats_fn(params0, m)["logps"] for m in train_micros]
  ref_val = [stats_fn(params0, m)["logps"] for m in val_micros]

  def pair_stats(micro, policy, reference):
    return loss_lib.PairStats(
        policy_logps=policy, reference_logps=reference, counts=policy * 0 + 1,
        pair_mask=micro["pair_mask"],
        gt_rewards=jnp.stack([micro["chosen_reward"], micro["rejected_reward"]], axis=1))

  def validate(params, cfg):
    sums = [loss_lib.dpo_loss(pair_stats(m, stats_fn(params, m)["logps"], r), cfg,
                              num_pairs=jnp.sum(m["pair_mask"]))[1]
            for m, r in zip(val_micros, ref_val)]
    return loss_lib.finalize_metrics(jax.tree.map(lambda *x: sum(x), *sums))

  beta = 0.1
  g = data["train_gt"][:8, 0] - data["train_gt"][:8, 1]  # The first batch's reward gaps.
  first_loss = {  # Policy = reference: beta * delta = 0.
      "dpo": math.log(2), "ipo": 1 / (4 * beta ** 2), "rpo_sq": np.mean(g ** 2),
      "rpo_bwd_kl": np.mean(np.log(2) + np.log(1 / (1 + np.exp(-g))) / (1 + np.exp(-g))
                            + np.log(1 / (1 + np.exp(g))) / (1 + np.exp(g))),
      "rpo_fwd_kl": np.mean(np.log(0.5) + np.log1p(np.exp(-g)) / 2 + np.log1p(np.exp(g)) / 2)}
  assert np.ptp(g) > 0  # The file's rewards differ from the defaults' constant gap of 1.
  for name, expected_first in first_loss.items():
    cfg = config_lib.LossConfig(losses=(name,), beta=beta)

    def loss_of(policy, reference, micro, cfg=cfg):
      return loss_lib.dpo_loss(pair_stats(micro, policy, reference), cfg,
                               num_pairs=jnp.sum(micro["pair_mask"]))

    grad_fn = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
    params, opt = params0, tx.init(params0)
    before = validate(params, cfg)
    for i in range(train_cfg.max_steps):
      k = i % len(train_micros)
      policy = stats_fn(params, train_micros[k])["logps"]
      (value, sums), cot = grad_fn(policy, ref_train[k], train_micros[k])
      if i == 0:
        np.testing.assert_allclose(float(value), expected_first, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(loss_lib.finalize_metrics(sums)["loss"], expected_first,
                                   rtol=1e-5, err_msg=name)
      params, opt = update_fn(params, opt, vjp_fn(params, train_micros[k], cot))
    after = validate(params, cfg)
    assert before["accuracy"] == 0.0 and before["rewards_margin_mean"] == 0.0, name
    assert after["accuracy"] >= 0.75, (name, after)
    assert after["rewards_margin_mean"] > 0, (name, after)


@pytest.mark.slow  # Keeps `-m "not slow"` under 3 minutes.
def test_equal_weights_give_exact_ties_in_the_train_step(data, tiny_model):
  """Policy = reference (a live copy, step 1): the policy's log-probs under value_and_grad
  equal the reference forward's bit for bit, so every reward is exactly 0 and no pair counts
  as correct (TRL reports 0 there too); a rounding-level difference would flip ties at
  random and report an accuracy near 0.5."""
  mcfg, params = tiny_model
  cfg = step_lib.StepConfig(model=mcfg)
  c = tiny_config()
  tx, schedule = step_lib.make_optimizer(c.train)
  train, evaluate = step_lib.jit_steps(cfg, tx, schedule)
  batch = next(iter(batching.train_dataset(data["train"], global_batch_size=8,
                                            micro_batch_size=4, seed=0)))
  batch = jax.tree.map(jnp.asarray, batch)
  state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)
  _, metrics = train(state, params, batch)
  for m in (jax.device_get(metrics), jax.device_get(evaluate(params, params, batch))):
    assert float(m["accuracy"]) == 0.0
    assert float(m["rewards_margin_mean"]) == 0.0 and float(m["rewards_chosen_mean"]) == 0.0
