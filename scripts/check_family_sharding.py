"""Sharded DPO steps of a Gemma-style model (every family option on) equal one device's.

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
     python scripts/check_family_sharding.py
Prints the losses of 3 steps and the largest parameter difference per mesh (data, fsdp,
tensor). Not in the test suite for its time (about a minute on 2 cores); tests/test_sharding.py
covers the sharding rules on the default model."""

import dataclasses, os, sys
import jax, jax.numpy as jnp, numpy as np, ml_collections
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import tiny_config
from dpojax import model as model_lib
from dpojax.data import batching
from dpojax.train import build as build_lib, compiled, sharding, step as step_lib

config = tiny_config()
m = config.model
m.num_layers, m.num_attention_heads, m.num_query_groups = 2, 4, 2
m.normalization, m.activation = "rmsnorm1p", "geglu"
m.post_norms = m.scale_embeddings = m.qk_norm = m.qkv_bias = True
m.attention_softcap, m.final_logit_softcap, m.query_pre_attn_scalar = 5.0, 3.0, 12.0
m.sliding_window, m.layer_types = 6, ("sliding_attention", "full_attention")
_, train_data, _, step_cfg = build_lib.build(config)
batches = [batching.collate([train_data[i] for i in range(8 * s, 8 * s + 8)], micro_batch_size=4,
                            seq_len=48, opts=train_data.opts) for s in range(3)]
tx, schedule = step_lib.make_optimizer(config.train)

def train(shape, devices):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.AXES, shape))), devices)
  cfg = dataclasses.replace(step_cfg, mesh=mesh)
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  state = step_lib.init_state(params, tx)
  fn, _, state_sh, ref_sh = compiled.compile_steps(cfg, tx, schedule, state, params, mesh, batches[0])
  ref = jax.device_put(jax.tree.map(jnp.copy, params), ref_sh)
  state = jax.device_put(state, state_sh)
  losses = []
  for b in batches:
    state, mt = fn(state, ref, sharding.global_batch(b, mesh))
    losses.append(float(mt["loss"]))
  return state, losses

single, l1 = train((1, 1, 1), jax.devices()[:1])
for shape in ((2, 2, 2), (1, 2, 4), (1, 8, 1)):
  st, l8 = train(shape, jax.devices())
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), st.params, single.params)))
  print(shape, "losses", l1, l8, "max param diff", diff)
  assert diff < 1e-5 and np.allclose(l1, l8, rtol=1e-5), shape
