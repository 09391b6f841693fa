"""LoRA adapters: the adapted forward, the merge for export, training and its state."""

import dataclasses
import functools
import math
import os

import jax
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax.checkpoint.orbax import Checkpointer
from dpojax.data import batching
from dpojax.model import lora
from dpojax.ops import logprob as logprob_lib
from dpojax.train import build as build_lib
from dpojax.train import reference
from dpojax.train import step as step_lib

from conftest import load_default_config, tiny_config

GATED = model_lib.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=48, attention_block=0,
                              scan_unroll=1)
PLAIN = model_lib.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                              num_query_groups=None, attention_block=0, scan_unroll=1,
                              ffn_hidden_size=48, activation="gelu", normalization="layernorm",
                              bias=True, position_embedding_type="learned_absolute",
                              share_embeddings_and_output_weights=False, remat="dots")


def numpy_params(mcfg, seed):
  """Random weights in the model's structure without compiling its init (slow on 2 cores):
  N(0, 0.02), norm scales N(1, 0.02)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, mcfg), jax.random.key(0))
  def leaf(path, s):
    x = 0.02 * rng.standard_normal(s.shape)
    return (x + (jax.tree_util.keystr(path).endswith("['scale']"))).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_batch(seed, vocab, rows=3, t=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, t)).astype(np.int32)
  positions = np.tile(np.arange(t, dtype=np.int32), (rows, 1))
  segments = np.ones((rows, t), np.int32)
  segments[0, 10:] = 2  # Two packed sequences in row 0.
  positions[0, 10:] = np.arange(t - 10)
  return tokens, positions, segments


def random_adapters(mcfg, lcfg, seed):
  """Adapters with non-zero B (a trained state)."""
  adapters = lora.init(mcfg, lcfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(adapters)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(
      np.float32) for x in leaves])


@pytest.mark.parametrize("mcfg", [GATED, PLAIN], ids=["swiglu_rope_gqa", "gelu_bias_abs_remat"])
def test_adapted_model_zero_b_is_base_and_merge_is_exact(mcfg):
  """B = 0: exactly the base model. Trained adapters: the merged weights (export) give the
  adapted model's per-token log-probs within 1e-5, and merge adds scale * A @ B (float64).
  Dropout (training only) acts on the adapter output: none when B = 0."""
  lcfg = lora.LoraConfig(targets=("all",), rank=4, alpha=8.0, dropout=0.5)
  params = numpy_params(mcfg, 0)
  tokens, positions, segments = random_batch(0, mcfg.vocab_size)
  targets, mask, _ = logprob_lib.shift_targets(tokens, segments, np.ones_like(tokens), segments)

  @jax.jit
  def logps(base, adapters):
    hidden = lora.apply(base, adapters, mcfg, lcfg, tokens, positions, segments)
    return hidden, logprob_lib.logprob(hidden, model_lib.output_weight(base, mcfg), targets,
                                       mask, impl="xla")

  fresh = lora.init(mcfg, lcfg, jax.random.key(1))
  np.testing.assert_array_equal(fresh["layers"]["attention"]["qkv"]["lora_b"], 0.0)
  hidden_base, logp_base = logps(params, None)
  hidden_fresh, _ = logps(params, fresh)
  np.testing.assert_array_equal(hidden_fresh, hidden_base)

  trained = random_adapters(mcfg, lcfg, 2)
  merged = jax.jit(functools.partial(lora.merge, model_cfg=mcfg, lora_cfg=lcfg))(params, trained)
  hidden_adapted, logp_adapted = logps(params, trained)
  _, logp_merged = logps(merged, None)
  assert np.abs(logp_adapted - logp_base).max() > 0.1  # The adapters do change the model.
  np.testing.assert_allclose(logp_merged, logp_adapted, atol=1e-5, rtol=0)

  # The merge formula, in float64.
  n, g = mcfg.num_attention_heads, mcfg.groups
  f64 = lambda x: np.asarray(x, np.float64)
  ad = trained["layers"]
  delta = lambda ab: 2.0 * np.stack([np.tensordot(a, b, axes=1) for a, b in zip(
      f64(ab["lora_a"]), f64(ab["lora_b"]))])
  qkv = delta(ad["attention"]["qkv"])  # [L, D, N + 2G, K]
  expect = {("attention", "query"): qkv[:, :, :n], ("attention", "key"): qkv[:, :, n:n + g],
            ("attention", "value"): qkv[:, :, n + g:],
            ("attention", "out"): delta(ad["attention"]["out"]),
            ("mlp", "fc1"): delta(ad["mlp"]["fc1"]), ("mlp", "fc2"): delta(ad["mlp"]["fc2"])}
  for (module, name), dw in expect.items():
    np.testing.assert_allclose(f64(merged["layers"][module][name]),
                               f64(params["layers"][module][name]) + dw, atol=1e-6)
  untouched = ("embedding", "final_norm") + (("output", "position_embedding")
                                             if mcfg is PLAIN else ())
  for key in untouched:
    jax.tree.map(np.testing.assert_array_equal, merged[key], params[key])

  # Shared-prompt branch ids reach the adapted model's attention mask as the base model's.
  t = tokens.shape[1]
  branches = np.broadcast_to(np.where(np.arange(t) < t // 2, 0, 1 + np.arange(t) % 2),
                             tokens.shape).astype(np.int32)
  branched = jax.jit(lambda base, adapters: lora.apply(base, adapters, mcfg, lcfg, tokens,
                                                       positions, segments, branches))
  np.testing.assert_allclose(branched(params, trained), branched(merged, None), atol=1e-5)
  assert np.abs(branched(params, trained) - hidden_adapted).max() > 1e-3

  if mcfg is GATED:
    dropped = jax.jit(lambda a, rng: lora.apply(params, a, mcfg, lcfg, tokens, positions,
                                                segments, dropout_rng=rng))
    k1, k2 = jax.random.key(7), jax.random.key(8)
    # B = 0: no adapter output to drop, so the first loss stays ln 2 (up to float rounding of
    # a differently fused program).
    np.testing.assert_allclose(dropped(fresh, k1), hidden_base, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(dropped(trained, k1), dropped(trained, k1))
    assert np.abs(dropped(trained, k1) - dropped(trained, k2)).max() > 1e-3
    assert np.abs(dropped(trained, k1) - hidden_adapted).max() > 1e-3


@pytest.mark.parametrize("key,value,message", [
    ("targets", ("attention_qkv", "mlp"), None),
    ("targets", ("attention_qkv", "lm_head"), r"lora.targets\[1\]='lm_head' is not one of"),
    ("targets", (), r"lora.targets=\(\) must be a non-empty list"),
    ("rank", 0, "lora.rank=0 must be a positive integer"),
    ("alpha", -1.0, "lora.alpha=-1.0 must be positive"),
    ("dropout", 1.0, r"lora.dropout=1.0 must be in \[0, 1\)"),
    ("bogus", 1, r"unknown config keys: \['lora.bogus'\]"),
])
def test_config_errors_name_the_key(key, value, message):
  cfg = tiny_config().lora
  cfg.enabled = True
  with cfg.unlocked():
    cfg[key] = value
  if message is None:
    got = config_lib.lora_config(cfg)
    assert got.targets == ("attention_qkv", "mlp_fc1", "mlp_fc2") and got.scale == 1.0
    return
  with pytest.raises(lora.ConfigError, match=message):
    config_lib.lora_config(cfg)


@pytest.mark.slow
def test_lora_training_learns_with_small_state(tmp_path):
  """Adapters only: the first loss is ln 2, validation accuracy rises from 0, the base never
  changes, and the state (= the checkpoint) holds adapters and their Adam moments only."""
  config = tiny_config()
  config.lora.enabled, config.lora.targets, config.lora.rank = True, ("all",), 8
  config.train.learning_rate, config.train.max_steps = 1e-2, 20
  config.train.global_batch_size, config.train.micro_batch_size = 16, 8
  _, train_data, val_data, step_cfg = build_lib.build(config)
  step_cfg = config_lib.step_config(config, step_cfg)
  assert step_cfg.reference == "lora_base" and step_cfg.lora.targets == lora.ALIASES["all"]
  params = jax.device_put(numpy_params(step_cfg.model, 0), jax.devices()[0])
  base_before = jax.tree.map(np.array, params)
  parts = reference.split(step_cfg, params)
  assert parts.frozen["base"] is params and parts.state_ref is None  # No copy of the weights.
  tx, schedule = step_lib.make_optimizer(config.train)
  # Committed like the step's outputs, so the second step does not compile again.
  state = jax.device_put(step_lib.init_state(parts.trainable, tx), jax.devices()[0])
  train = jax.jit(functools.partial(step_lib.train_step, cfg=step_cfg, tx=tx, schedule=schedule))
  evaluate = jax.jit(functools.partial(step_lib.eval_step, cfg=step_cfg))
  val = batching.eval_batches(val_data, global_batch_size=16, micro_batch_size=8, max_batches=2)

  def val_metrics(adapters):
    sums = [evaluate(adapters, parts.frozen, b) for b in val]
    return loss_lib.finalize_metrics(jax.device_get(jax.tree.map(lambda *x: sum(x), *sums)))

  before = val_metrics(state.params)
  assert abs(before["loss"] - math.log(2)) < 1e-6 and before["accuracy"] == 0.0
  batches = iter(batching.train_dataset(train_data, global_batch_size=16, micro_batch_size=8,
                                        seed=0))
  for i in range(config.train.max_steps):
    state, metrics = train(state, parts.frozen, next(batches))
    if i == 0:
      first = loss_lib.finalize_metrics(jax.device_get(metrics))
      assert abs(first["loss"] - math.log(2)) < 1e-6 and first["accuracy"] == 0.0
  after = val_metrics(state.params)
  assert after["accuracy"] >= 0.8 and after["loss"] < before["loss"] - 0.05, after
  jax.tree.map(np.testing.assert_array_equal, parts.frozen["base"], base_before)

  # The state is adapters + two Adam moments (+ scalars); report the sizes.
  adapter_bytes, full_bytes = lora.nbytes(state.params), lora.nbytes(params)
  state_bytes = lora.nbytes(state)
  assert 3 * adapter_bytes <= state_bytes < 3 * adapter_bytes + 1024
  ckpt = Checkpointer(str(tmp_path), async_save=False, keep_best=False)
  ckpt.save(config.train.max_steps, state, {"next_index": 0})
  restored, _ = ckpt.restore(config.train.max_steps, state)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs)
  print(f"adapters {adapter_bytes} B, full params {full_bytes} B, LoRA state {state_bytes} B, "
        f"a full-model state would be {3 * full_bytes} B; adapter checkpoint on disk {on_disk} B")
  assert adapter_bytes < full_bytes / 2
  merged = reference.policy_params(step_cfg, state.params, parts.frozen)  # What export writes.
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_lora_config_defaults_are_the_config_files():
  """configs/dpo_gpt.py's `lora` section gives the dataclass defaults; its one other key,
  `enabled`, is whether a LoraConfig exists at all (from_config returns None when off)."""
  section = load_default_config().lora.to_dict()
  defaults = {f.name: f.default for f in dataclasses.fields(lora.LoraConfig)}
  assert set(section) == set(defaults) | {"enabled"} and section["enabled"] is False
  for name, default in defaults.items():
    got = tuple(section[name]) if name == "targets" else section[name]
    assert got == default, name
  section["enabled"] = True
  assert config_lib.lora_config(section) == lora.LoraConfig()
