"""The segment-skipping flash-attention kernels (interpreted on CPU) against the dense path."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import model as model_lib
from dpojax.ops import flash_attention as fa

from conftest import ROOT

CASES = {  # B, T, N, G, K, segment ids per row.
    "packed_padded_gqa": (2, 20, 4, 2, 8, [[1] * 6 + [2] * 9 + [3] * 3 + [0] * 2, [1] * 20]),
    # T padded to the 64-token tiles; an id that comes back after another (5 2 5).
    "ragged_noncontiguous": (2, 200, 4, 2, 16, [[1] * 70 + [2] * 75 + [3] * 40 + [0] * 15,
                                                [5] * 50 + [2] * 100 + [5] * 50]),
    "mqa_head_dim_24": (1, 256, 2, 1, 24, [[1] * 100 + [2] * 100 + [3] * 56]),
}


def make(b, t, n, g, kd, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, kd)), jnp.float32)
  k, v, = (jnp.asarray(rng.normal(size=(b, t, g, kd)), jnp.float32) for _ in range(2))
  return q, k, v, jnp.asarray(rng.normal(size=q.shape), jnp.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_match_dense_attention(name):
  b, t, n, g, kd, seg = CASES[name]
  q, k, v, cot = make(b, t, n, g, kd)
  seg = jnp.asarray(seg)

  def grads(attend):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cot),
                                      argnums=(0, 1, 2)))(q, k, v)

  want = grads(lambda q, k, v: model_lib.attend(q, k, v, model_lib.attention_mask(seg)))
  kernels = {"ours": lambda q, k, v: fa.attention(q, k, v, seg)}
  if name == "packed_padded_gqa":  # JAX's kernel behind the same adapter (the comparison).
    kernels["jax"] = lambda q, k, v: fa.attention(q, k, v, seg, jax_kernel=True)
  for kernel, fn in kernels.items():
    got = grads(fn)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert np.abs(np.asarray(y)).max() > 0.1
      np.testing.assert_allclose(x, y, atol=3e-5, rtol=1e-5, err_msg=kernel)


@pytest.mark.parametrize("window,softcap,scale", [(40, 0.0, None), (70, 3.0, 0.2)])
def test_window_softcap_and_scale_match_dense_attention(window, softcap, scale):
  """Sliding windows (Mistral, Gemma), tanh logit caps and a custom scale (Gemma 2): values
  and gradients equal the dense path's mask (positions within each packed sequence) on
  ragged packed rows that span four 64-token tiles."""
  b, t, n, g, kd, seg = CASES["ragged_noncontiguous"]
  q, k, v, cot = make(b, t, n, g, kd, seed=2)
  seg = jnp.asarray(seg)
  # Positions restart per segment where the rows hold contiguous ones (row 0); row 1's ids
  # come back (5 2 5), so its positions run on as slots, as the kernel's window counts them.
  pos = jnp.asarray([np.concatenate([np.arange(70), np.arange(75), np.arange(40),
                                     np.arange(15)]), np.arange(200)])

  def grads(attend):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cot),
                                      argnums=(0, 1, 2)))(q, k, v)

  mask = model_lib.attention_mask(seg, None, pos, window)
  want = grads(lambda q, k, v: model_lib.attend(q, k, v, mask, 0, scale, softcap))
  got = grads(lambda q, k, v: fa.attention(q, k, v, seg, scale=scale, window=window,
                                           softcap=softcap))
  traced = grads(lambda q, k, v: fa.attention(q, k, v, seg, scale=scale, softcap=softcap,
                                              window=jnp.int32(window)))
  for x, y, z in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(traced)):
    assert np.abs(np.asarray(y)).max() > 0.1
    np.testing.assert_allclose(x, y, atol=3e-5, rtol=1e-5)
    np.testing.assert_array_equal(x, z)


def test_key_blocks_outside_the_window_are_never_read():
  """Keys 0-63 poisoned with NaN and a 40-token window: queries from 128 on (whose windows
  start at 89 or later) come out finite and exact only if the kernel skips that block."""
  q, k, v, cot = make(1, 256, 2, 1, 16, seed=3)
  seg = jnp.ones((1, 256), jnp.int32)
  clean = fa.attention(q, k, v, seg, window=40)
  out = fa.attention(q, k, v.at[:, :64].set(jnp.nan), seg, window=40)
  np.testing.assert_array_equal(out[:, 128:], clean[:, 128:])
  assert np.isnan(np.asarray(out[:, :64])).all()
  # Backward: dq of those queries, and dk/dv of the keys no poisoned query reaches.
  loss = lambda q, k, v: jnp.sum(fa.attention(q, k, v, seg, window=40)[:, 128:] * cot[:, 128:])
  dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v.at[:, :64].set(jnp.nan))
  dq0, dk0, dv0 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_array_equal(dq[:, 128:], dq0[:, 128:])
  np.testing.assert_array_equal(dk[:, 128:], dk0[:, 128:])
  np.testing.assert_array_equal(dv[:, 128:], dv0[:, 128:])


@pytest.mark.slow
def test_model_with_mixed_sliding_layers_equals_the_dense_path():
  """Gemma-style layers (window on alternate layers, softcap, scale) with attention_impl=flash:
  each layer picks its window inside the layer scan (a traced window); the packed row's
  logits and gradients equal the dense path's."""
  cfg = model_lib.ModelConfig(
      vocab_size=64, hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=2,
      ffn_hidden_size=48, sliding_window=5, attention_softcap=4.0, query_pre_attn_scalar=10.0,
      layer_types=("sliding_attention", "full_attention", "sliding_attention"),
      attention_block=0)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 20)), jnp.int32)
  seg = jnp.asarray([[1] * 12 + [2] * 8])
  pos = jnp.asarray([list(range(12)) + list(range(8))])

  def run(impl):
    c = dataclasses.replace(cfg, attention_impl=impl)
    f = lambda p: jnp.sum(model_lib.apply(p, c, tokens, pos, seg) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  for x, y in zip(jax.tree.leaves(run("flash")), jax.tree.leaves(run("xla"))):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-5)
  assert model_lib.attention_path(dataclasses.replace(cfg, attention_impl="flash")) == (
      "flash (window 5 on 2/3 layers, logit softcap 4, scale 10^-1/2)")
  assert model_lib.attention_path(dataclasses.replace(cfg, attention_impl="sparse")) == (
      "sparse -> xla (sparse has no logit softcap 4, scale 10^-1/2, per-layer windows) "
      "(window 5 on 2/3 layers, logit softcap 4, scale 10^-1/2)")


@pytest.mark.slow
def test_blocks_of_other_segments_are_never_read():
  """Values of segment 1 poisoned with NaN: a kernel that visits its key blocks (even masked)
  turns segment 2's outputs and key gradients into NaN; the skipping kernel gives segment 2
  exactly what it gets alone."""
  q, k, v, cot = make(1, 256, 2, 1, 16, seed=1)
  seg = jnp.asarray([[1] * 128 + [2] * 128])
  v_poisoned = v.at[:, :128].set(jnp.nan)
  loss = lambda q, k, v, seg: jnp.sum(fa.attention(q, k, v, seg) * cot[:, -q.shape[1]:])
  out = fa.attention(q, k, v_poisoned, seg)[:, 128:]
  alone = fa.attention(q[:, 128:], k[:, 128:], v[:, 128:], seg[:, 128:])
  np.testing.assert_allclose(out, alone, atol=1e-6)
  dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v_poisoned, seg)
  dq1, dk1, dv1 = jax.grad(loss, argnums=(0, 1, 2))(q[:, 128:], k[:, 128:], v[:, 128:],
                                                    seg[:, 128:])
  for x, y in ((dq, dq1), (dk, dk1), (dv, dv1)):
    np.testing.assert_allclose(x[:, 128:], y, atol=1e-5)
  assert np.isnan(np.asarray(fa.attention(q, k, v_poisoned, seg, jax_kernel=True))).any()


def test_segment_bounds_against_a_loop():
  seg = np.asarray([[5, 5, 2, 2, 2, 5, 0, 0, -1], [1, 1, 1, 1, 3, 3, 3, 0, 0]])
  first, last = (np.asarray(x) for x in fa.segment_bounds(jnp.asarray(seg)))
  for b in range(2):
    for t in range(seg.shape[1]):
      same = np.flatnonzero(seg[b] == seg[b, t])
      assert (first[b, t], last[b, t]) == (same.min(), same.max())


@pytest.mark.parametrize("t", [40, 4096])
def test_kernels_lower_to_triton_for_gpu(t):
  """Without a GPU: the Pallas -> Triton lowering (which wants power-of-two blocks) accepts
  the forward, dq and dk/dv kernels (fp32 and bf16, GQA, with a softcap and a window), for
  4096-token rows and a short row padded to 64; compiling Triton to PTX needs the GPU."""
  for dtype, softcap, window in ((jnp.float32, 0.0, 0), (jnp.bfloat16, 0.0, 0),
                                 (jnp.bfloat16, 50.0, 16)):  # Gemma 2's cap and a window.
    specs = [jax.ShapeDtypeStruct((2, t, 32, 64), dtype)] + [
        jax.ShapeDtypeStruct((2, t, 4, 64), dtype)] * 2 + [
            jax.ShapeDtypeStruct((2, t), jnp.int32)]

    def fn(q, k, v, seg):
      out, vjp = jax.vjp(lambda q, k, v: fa.attention(
          q, k, v, seg, interpret=False, softcap=softcap, window=window, scale=0.1), q, k, v)
      return out, vjp(out)

    hlo = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 3, dtype


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P
from dpojax import model as model_lib
from dpojax.ops import flash_attention as fa
from dpojax.train import sharding
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
rng = np.random.default_rng(3)
seg = np.asarray([[1] * 30 + [2] * 34, [1] * 64, [3] * 10 + [4] * 50 + [0] * 4, [1] * 64])
for g in (2, 1):  # Heads split over tensor; MQA (one group): heads left to XLA.
  q = rng.normal(size=(4, 64, 4, 16)).astype(np.float32)
  k, v = (rng.normal(size=(4, 64, g, 16)).astype(np.float32) for _ in range(2))
  cot = rng.normal(size=q.shape).astype(np.float32)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  rows = P(("data", "fsdp"))
  args = [put(x, rows) for x in (q, k, v, seg, cot)]
  def grads(attend):
    f = lambda q, k, v, s, c: jnp.sum(attend(q, k, v, s) * c)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  ours = grads(lambda q, k, v, s: fa.attention(q, k, v, s, mesh=mesh))
  dense = grads(lambda q, k, v, s: model_lib.attend(q, k, v, model_lib.attention_mask(s)))
  for x, y in zip(jax.tree.leaves(ours(*args)), jax.tree.leaves(dense(*args))):
    np.testing.assert_allclose(x, y, atol=3e-5, rtol=1e-5)
  hlo = ours.lower(*args).compile().as_text()
  print(g, "all-gather" in hlo)
"""


def test_sharded_over_an_8_device_mesh_matches_dense_without_gathering_rows():
  """data=2 x fsdp=2 x tensor=2 (emulated CPU devices): the per-shard kernel gives the dense
  result and gradients; with heads divisible by tensor, no row or head is gathered."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[0] == "2 False", proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full_remat", "lora"])
def test_dpo_steps_with_the_kernel_equal_the_dense_path(variant):
  """Two DPO steps on packed rows (3 pairs per row, 2 micro-batches) through the whole train
  step (scan over layers and micro-batches, remat or LoRA adapters on all targets) give the
  dense path's parameters and metrics."""
  from dpojax import config as config_lib
  from dpojax.data import packing
  from dpojax.train import build as build_lib
  from dpojax.train import reference
  from dpojax.train import step as step_lib

  from conftest import tiny_config
  from test_logprob_kernels import synthetic_pairs
  from test_lora import numpy_params

  config = tiny_config()
  if variant == "lora":
    config.lora.enabled, config.lora.targets, config.lora.rank = True, ("all",), 4
  config.train.learning_rate = 1e-2
  _, _, _, base_cfg = build_lib.build(config)
  pairs = synthetic_pairs(6, base_cfg.model.vocab_size, 2)
  batch = packing.collate_rows([[0, 1, 2], [3, 4, 5]], pairs.__getitem__, micro_rows=1,
                               pack_size=160, pairs_per_row=3, default_rewards=(1.0, 0.0))
  tx, schedule = step_lib.make_optimizer(config.train)
  results = {}
  for impl in ("xla", "flash"):
    model_cfg = dataclasses.replace(base_cfg.model, attention_impl=impl,
                                    remat="full" if variant == "full_remat" else "none")
    step_cfg = config_lib.step_config(config, dataclasses.replace(base_cfg, model=model_cfg))
    parts = reference.split(step_cfg, numpy_params(model_cfg, 0))
    state = step_lib.init_state(parts.trainable, tx)
    step = jax.jit(functools.partial(step_lib.train_step, cfg=step_cfg, tx=tx,
                                     schedule=schedule))
    start = jax.tree.map(np.array, parts.trainable)
    for _ in range(2):
      state, metrics = step(state, parts.frozen, batch)
    results[impl] = state.params, metrics
  (p_dense, m_dense), (p_flash, m_flash) = results["xla"], results["flash"]
  assert float(m_dense["num_pairs"]) == 6
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p_dense, start)
  assert max(jax.tree.leaves(moved)) > 1e-4  # The gradients (through the kernel) did something.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5),
               p_flash, p_dense)
  for key in m_dense:
    np.testing.assert_allclose(m_flash[key], m_dense[key], rtol=1e-5, atol=1e-5, err_msg=key)
