"""Reference modes: precomputed log-probs (and their cache), TR-DPO sync, LoRA's base as the
reference (memory), and the config checks."""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax.data import batching, pipeline
from dpojax.data.tokenize import Tokenizer
from dpojax.model import lora
from dpojax.train import precompute
from dpojax.train import reference
from dpojax.train import step as step_lib

from conftest import ROOT, tiny_config
from test_lora import numpy_params

ASSETS = os.path.join(ROOT, "dpojax", "assets")


def write_jsonl(path, source, lines):
  with open(os.path.join(ASSETS, source)) as f:
    records = [json.loads(l) for l in f][:lines]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny model, 40 training pairs, and train-step settings shared by the tests."""
  tmp = tmp_path_factory.mktemp("ref")
  config = tiny_config()
  opts = pipeline.DataOptions.from_config(config.data)
  tok = Tokenizer(config.data.tokenizer_path)
  data = pipeline.PreferenceData(write_jsonl(tmp / "train.jsonl", "toy_prefs_train.jsonl", 40),
                                 tok, opts)
  mcfg = model_lib.ModelConfig.from_dict(config.model)
  params = jax.device_put(numpy_params(mcfg, 0), jax.devices()[0])
  tx, schedule = step_lib.make_optimizer(config.train)
  return dict(config=config, tok=tok, opts=opts, data=data, mcfg=mcfg, params=params, tx=tx,
              schedule=schedule, tmp=tmp)


_JITTED = {}


def init_state(trainable, tx, ref=None):
  """Committed like the step's outputs, so the second step does not compile again."""
  return jax.device_put(step_lib.init_state(trainable, tx, ref=ref), jax.devices()[0])


def jit_train(cfg, setup):
  """One jitted train step per config for the module (compiling is the slow part here)."""
  if cfg not in _JITTED:
    _JITTED[cfg] = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, tx=setup["tx"],
                                             schedule=setup["schedule"]))
  return _JITTED[cfg]


# --- precomputed ---------------------------------------------------------------------------
@pytest.mark.slow
def test_precomputed_gives_the_copy_losses_and_is_cached(setup, monkeypatch):
  data, params = setup["data"], setup["params"]
  copy_cfg = step_lib.StepConfig(model=setup["mcfg"], beta=0.1)
  pre_cfg = dataclasses.replace(copy_cfg, reference="precomputed")
  ref_cfg = config_lib.ReferenceConfig(mode="precomputed", cache_dir=str(setup["tmp"] / "cache"))
  # Precompute batches (4 pairs, micro 2) differ from the training batch's layout.
  tables = precompute.precompute_tables(pre_cfg, ref_cfg, params, {"train": data},
                                       pairs_per_batch=4, micro_batch_size=2)
  table = tables["train"]
  assert table.shape == (len(data), 2) and np.all(table < 0)

  # A training batch in another order, with padding pairs; 2 micro-batches of 4.
  order = [17, 3, None, 30, 8, 25, None, 0]
  host = batching.collate([None if i is None else data[i] for i in order], micro_batch_size=4,
                          seq_len=48, opts=data.opts)
  np.testing.assert_array_equal(host["pair_index"], [[17, 3, -1, 30], [8, 25, -1, 0]])
  with_ref = precompute.add_ref_logps(host, table)
  np.testing.assert_array_equal(with_ref["ref_logps_chosen"][0, 2], 0.0)
  np.testing.assert_array_equal(with_ref["ref_logps_rejected"][0, 2], 0.0)
  np.testing.assert_array_equal(with_ref["ref_logps_chosen"][1, 1], table[25, 0])
  np.testing.assert_array_equal(with_ref["ref_logps_rejected"][1, 1], table[25, 1])
  # copy: the reference held in the state (as TR-DPO holds it; the step is shared with the
  # test below), the initial policy.
  parts_copy = reference.split(copy_cfg, params, sync=True)
  parts_pre = reference.split(pre_cfg, params)
  assert parts_pre.frozen == {}  # No reference weights during training.
  s_copy, m_copy = jit_train(copy_cfg, setup)(
      init_state(parts_copy.trainable, setup["tx"], ref=parts_copy.state_ref),
      parts_copy.frozen, host)
  s_pre, m_pre = jit_train(pre_cfg, setup)(
      init_state(parts_pre.trainable, setup["tx"]), parts_pre.frozen, with_ref)
  assert float(m_copy["num_pairs"]) == 6
  for key in m_copy:
    np.testing.assert_allclose(m_pre[key], m_copy[key], atol=1e-5, rtol=0, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s_pre.params,
               s_copy.params)

  # A second run reuses the cache: no forward pass at all.
  def fail(*args, **kwargs):
    raise AssertionError("recomputed despite a valid cache")
  monkeypatch.setattr(precompute, "compute_logps", fail)
  again = precompute.precompute_tables(pre_cfg, ref_cfg, params, {"train": data},
                                      pairs_per_batch=4, micro_batch_size=2)
  np.testing.assert_array_equal(again["train"], table)
  # A damaged cache file is recomputed, not trusted.
  monkeypatch.undo()
  key = precompute.cache_key(data, pre_cfg, precompute.params_fingerprint(params))
  npy = os.path.join(ref_cfg.resolved_cache_dir, key + ".npy")
  np.save(npy, np.zeros((3, 2), np.float32))
  assert precompute.load_cached(ref_cfg.resolved_cache_dir, key, len(data)) is None
  fixed = precompute.precompute_tables(pre_cfg, ref_cfg, params, {"train": data},
                                      pairs_per_batch=4, micro_batch_size=2)
  np.testing.assert_array_equal(fixed["train"], table)
  assert np.load(npy).shape == (len(data), 2)


def test_cache_key_covers_data_model_template_tokenizer(setup):
  data, params, cfg = setup["data"], setup["params"], step_lib.StepConfig(model=setup["mcfg"])
  fp = precompute.params_fingerprint(params)
  key = precompute.cache_key(data, cfg, fp)
  same = pipeline.PreferenceData(data.path, setup["tok"], setup["opts"])
  assert precompute.cache_key(same, cfg, precompute.params_fingerprint(
      jax.tree.map(jnp.copy, params))) == key
  other_file = pipeline.PreferenceData(
      write_jsonl(setup["tmp"] / "other.jsonl", "toy_prefs_train.jsonl", 41), setup["tok"],
      setup["opts"])
  template = pipeline.PreferenceData(data.path, setup["tok"],
                                     dataclasses.replace(setup["opts"], template="chatml"))
  nudged = jax.tree.map(lambda x: x, params)
  nudged["final_norm"]["scale"] = params["final_norm"]["scale"].at[3].add(1e-7)
  ld = dataclasses.replace(cfg, loss=config_lib.LossConfig(ld_alpha=0.5))
  bf16 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
  keys = {key, precompute.cache_key(other_file, cfg, fp), precompute.cache_key(template, cfg, fp),
          precompute.cache_key(data, cfg, precompute.params_fingerprint(nudged)),
          precompute.cache_key(data, ld, fp), precompute.cache_key(data, bf16, fp)}
  assert len(keys) == 6


def test_add_ref_logps_errors():
  batch = {"pair_mask": np.ones((1, 2), np.float32)}
  with pytest.raises(KeyError, match="needs batches with 'pair_index'"):
    precompute.add_ref_logps(batch, np.zeros((4, 2), np.float32))
  batch["pair_index"] = np.array([[0, -1]], np.int32)
  with pytest.raises(ValueError, match="pair_index out of range"):
    precompute.add_ref_logps(batch, np.zeros((4, 2), np.float32))


# --- TR-DPO ---------------------------------------------------------------------------------
def test_sync_is_the_formula():
  rng = np.random.default_rng(0)
  ref = {"a": rng.standard_normal((5, 3)).astype(np.float32),
         "b": {"c": rng.standard_normal(7).astype(np.float32)},
         "h": rng.standard_normal(6).astype(jnp.bfloat16)}
  policy = jax.tree.map(lambda x: (np.asarray(x, np.float32) + 1).astype(x.dtype), ref)
  sync = jax.jit(reference.sync, static_argnums=2)
  for alpha in (0.3, 0.6, 1.0):
    got = sync(ref, policy, alpha)
    for g, r, p in zip(jax.tree.leaves(got), jax.tree.leaves(ref), jax.tree.leaves(policy)):
      want = alpha * np.float64(p) + (1 - alpha) * np.float64(r)
      assert g.dtype == r.dtype
      if r.dtype == np.float32:
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)
      else:  # bfloat16: the float32 result rounded once.
        np.testing.assert_array_equal(np.float32(g), np.float32(want.astype(np.float32).astype(
            jnp.bfloat16)))
    if alpha == 1.0:
      jax.tree.map(np.testing.assert_array_equal, got, policy)


@pytest.mark.slow  # Keeps `-m "not slow"` under 3 minutes.
def test_tr_dpo_sync_during_training(setup):
  """Every 2 steps ref <- 0.5 policy + 0.5 ref (after the optimizer step), from the state; the
  step and eval use state.ref; in between the reference does not move."""
  data, params = setup["data"], setup["params"]
  cfg = step_lib.StepConfig(model=setup["mcfg"], beta=0.1)
  parts = reference.split(cfg, params, sync=True)
  assert parts.frozen == {} and parts.state_ref is not None
  state = init_state(parts.trainable, setup["tx"], ref=parts.state_ref)
  train = jit_train(cfg, setup)
  sync = jax.jit(functools.partial(reference.sync_state, cfg=cfg, alpha=0.5))
  host = batching.collate([data[i] for i in range(8)], micro_batch_size=4, seq_len=48,
                          opts=data.opts)
  f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
  ref = f64(params)
  for step in range(1, 5):
    state, _ = train(state, parts.frozen, host)
    if step % 2 == 0:
      ref = jax.tree.map(lambda r, p: 0.5 * p + 0.5 * r, ref, f64(state.params))
      state = sync(state, parts.frozen)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 f64(state.ref), ref)
  assert int(state.step) == 4
  # Evaluation reads the reference from the state too: with the policy as its reference, the
  # rewards vanish and the loss is ln 2.
  evaluate = jax.jit(functools.partial(step_lib.eval_step, cfg=cfg))
  synced = loss_lib.finalize_metrics(jax.device_get(evaluate(state, parts.frozen, host)))
  selfref = loss_lib.finalize_metrics(jax.device_get(
      evaluate(state.replace(ref=state.params), parts.frozen, host)))
  assert abs(synced["rewards_margin_mean"]) > 1e-4
  assert selfref["rewards_margin_mean"] == 0 and abs(selfref["loss"] - math.log(2)) < 1e-6


def test_lora_sync_mixes_in_the_merged_policy(setup):
  mcfg, params = setup["mcfg"], setup["params"]
  cfg = step_lib.StepConfig(model=mcfg, lora=lora.LoraConfig(targets=("mlp_fc2",), rank=2))
  parts = reference.split(cfg, params, sync=True)
  assert set(parts.frozen) == {"base"}
  adapters = jax.tree.map(lambda x: x + 0.5, parts.trainable)
  state = step_lib.init_state(adapters, setup["tx"], ref=parts.state_ref)
  synced = reference.sync_state(state, parts.frozen, cfg=cfg, alpha=0.25)
  merged = lora.merge(params, adapters, mcfg, cfg.lora)
  want = 0.25 * np.float64(merged["layers"]["mlp"]["fc2"]) + 0.75 * np.float64(
      params["layers"]["mlp"]["fc2"])
  np.testing.assert_allclose(synced.ref["layers"]["mlp"]["fc2"], want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(synced.ref["embedding"], params["embedding"])


# --- memory ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_lora_base_saves_one_parameter_copy_of_peak_memory():
  """XLA's compiled memory analysis of the LoRA train step: the base as reference needs about
  one copy of the parameters less than a separate reference copy."""
  mcfg = model_lib.ModelConfig(vocab_size=512, hidden_size=128, num_layers=1,
                               num_attention_heads=4, num_query_groups=None, ffn_hidden_size=256)
  lcfg = lora.LoraConfig(rank=4)
  params = jax.eval_shape(functools.partial(model_lib.init_params, mcfg), jax.random.key(0))
  batch = {k: jax.ShapeDtypeStruct((1, 4, 16), jnp.int32) for k in pipeline.BATCH_KEYS}
  batch.update({k: jax.ShapeDtypeStruct((1, 2), jnp.float32) for k in pipeline.PAIR_KEYS})
  tx, schedule = step_lib.make_optimizer(tiny_config().train)
  totals = {}
  for mode in ("lora_base", "copy"):
    cfg = step_lib.StepConfig(model=mcfg, lora=lcfg, reference=mode)
    parts = reference.abstract_split(cfg, params)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), parts.trainable)
    compiled = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, tx=tx, schedule=schedule),
                       donate_argnums=0).lower(state, parts.frozen, batch).compile()
    m = compiled.memory_analysis()
    totals[mode] = (m.argument_size_in_bytes, m.temp_size_in_bytes + m.argument_size_in_bytes
                    + m.output_size_in_bytes - m.alias_size_in_bytes)
  param_bytes = lora.nbytes(params)
  assert totals["copy"][0] - totals["lora_base"][0] == param_bytes  # The arguments: exactly.
  saved = totals["copy"][1] - totals["lora_base"][1]
  assert 0.9 * param_bytes <= saved <= 1.1 * param_bytes, (saved, param_bytes, totals)


# --- configuration --------------------------------------------------------------------------
def run_config(**sections):
  c = ml_collections.ConfigDict({"lora": {"enabled": False}, "dpo": {"reference_free": False},
                                 "reference": {}})
  for key, value in sections.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.mark.parametrize("keys,expect", [
    ({}, "copy"),
    ({"lora__enabled": True}, "lora_base"),
    ({"dpo__reference_free": True}, "none"),
    ({"reference__mode": "precomputed", "lora__enabled": True}, "precomputed"),
    ({"reference__mode": "copy", "reference__sync_steps": 8}, "copy"),
    ({"reference__mode": "bogus"}, r"reference.mode='bogus' is not one of"),
    ({"reference__mode": "lora_base"}, "reference.mode=lora_base needs lora.enabled=True"),
    ({"reference__mode": "precomputed", "dpo__reference_free": True},
     "dpo.reference_free=True contradicts reference.mode='precomputed'"),
    ({"reference__mode": "precomputed", "reference__sync_steps": 4},
     r"reference.sync_steps=4 \(TR-DPO\) needs reference.mode=copy"),
    ({"lora__enabled": True, "reference__sync_steps": 4},
     r"reference.sync_steps=4 \(TR-DPO\) needs reference.mode=copy, not 'lora_base'"),
    ({"reference__sync_alpha": 0.0}, r"reference.sync_alpha=0.0 must be in \(0, 1\]"),
    ({"reference__sync_steps": -1}, "reference.sync_steps=-1 must be an integer >= 0"),
    ({"reference__cachedir": "x"}, r"unknown config keys: \['reference.cachedir'\]"),
])
def test_reference_config(keys, expect):
  config = run_config(**keys)
  if " " not in expect:
    assert config_lib.ReferenceConfig.from_config(config).mode == expect
  else:
    with pytest.raises(config_lib.ConfigError, match=expect):
      config_lib.ReferenceConfig.from_config(config)


def test_step_config_unifies_reference_free_and_none():
  mcfg = model_lib.ModelConfig()
  free = step_lib.StepConfig(model=mcfg, loss=config_lib.LossConfig(reference_free=True))
  assert free.reference == "none"
  none = step_lib.StepConfig(model=mcfg, reference="none")
  assert none.loss.reference_free and none == free
  with pytest.raises(ValueError, match="reference.mode=lora_base needs lora.enabled=True"):
    step_lib.StepConfig(model=mcfg, reference="lora_base")
  with pytest.raises(ValueError, match="contradicts reference.mode='precomputed'"):
    step_lib.StepConfig(model=mcfg, loss=config_lib.LossConfig(reference_free=True),
                        reference="precomputed")
  config = tiny_config()
  config.lora.enabled = True
  got = config_lib.step_config(config, step_lib.StepConfig(model=mcfg))
  assert got.reference == "lora_base" and got.lora.rank == 32 and got.lora.scale == 1.0
