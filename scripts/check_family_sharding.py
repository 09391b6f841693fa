"""Sharded DPO steps of a Gemma-style model (every family option on) equal one device's.

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
     python scripts/check_family_sharding.py [--steps 3] [--meshes 2,2,2 1,2,4 1,8,1]
Prints the losses of each step and the largest parameter difference per mesh (data, fsdp,
tensor), and fails (exit 1) when a parameter differs by 1e-5 or more or a loss by a relative
1e-5. The default (3 steps, 3 meshes) takes about a minute on 2 cores; tests/test_scripts.py
runs it with --steps 2 --meshes 2,2,2, and tests/test_sharding.py covers the sharding rules on
the default model."""

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import tiny_config  # noqa: E402
from dpojax import model as model_lib  # noqa: E402
from dpojax.data import batching  # noqa: E402
from dpojax.train import build as build_lib, compiled, sharding, step as step_lib  # noqa: E402

TOLERANCE = 1e-5  # Largest parameter difference, and relative loss difference, accepted.


def gemma_like_config():
  config = tiny_config()
  m = config.model
  m.num_layers, m.num_attention_heads, m.num_query_groups = 2, 4, 2
  m.normalization, m.activation = "rmsnorm1p", "geglu"
  m.post_norms = m.scale_embeddings = m.qk_norm = m.qkv_bias = True
  m.attention_softcap, m.final_logit_softcap, m.query_pre_attn_scalar = 5.0, 3.0, 12.0
  m.sliding_window, m.layer_types = 6, ("sliding_attention", "full_attention")
  return config


def train(step_cfg, tx, schedule, batches, shape, devices):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.AXES, shape))), devices)
  cfg = dataclasses.replace(step_cfg, mesh=mesh)
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  init = jax.tree.map(np.array, params)  # A host copy: the steps donate their input state.
  state = step_lib.init_state(params, tx)
  fn, _, state_sh, ref_sh = compiled.compile_steps(cfg, tx, schedule, state, params, mesh,
                                                   batches[0])
  ref = jax.device_put(jax.tree.map(jnp.copy, params), ref_sh)
  state = jax.device_put(state, state_sh)
  losses = []
  for b in batches:
    state, mt = fn(state, ref, sharding.global_batch(b, mesh))
    losses.append(float(mt["loss"]))
  return state, losses, init


def max_abs_diff(tree_a, tree_b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tree_a, tree_b)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3, help="DPO steps per mesh")
  p.add_argument("--meshes", nargs="+", default=["2,2,2", "1,2,4", "1,8,1"],
                 help="data,fsdp,tensor sizes, each multiplying to the device count")
  args = p.parse_args()
  config = gemma_like_config()
  _, train_data, _, step_cfg = build_lib.build(config)
  batches = [batching.collate([train_data[i] for i in range(8 * s, 8 * s + 8)],
                              micro_batch_size=4, seq_len=48, opts=train_data.opts)
             for s in range(args.steps)]
  tx, schedule = step_lib.make_optimizer(config.train)
  single, l1, init = train(step_cfg, tx, schedule, batches, (1, 1, 1), jax.devices()[:1])
  # What the steps moved the parameters by (the first step's learning rate is 0 in warmup):
  # a parameter difference is only a check where this is far above the tolerance.
  print("largest parameter update (one device)", max_abs_diff(single.params, init), flush=True)
  failed = []
  for shape in (tuple(int(n) for n in m.split(",")) for m in args.meshes):
    st, l8, _ = train(step_cfg, tx, schedule, batches, shape, jax.devices())
    diff = max_abs_diff(st.params, single.params)
    print(shape, "losses", l1, l8, "max param diff", diff, flush=True)
    if not (diff < TOLERANCE and np.allclose(l1, l8, rtol=TOLERANCE)):
      failed.append(shape)
  if failed:
    sys.exit(f"meshes differing from one device beyond {TOLERANCE}: {failed}")


if __name__ == "__main__":
  main()
