"""The compiled train step of `step_cfg` on a mesh of `shape`, as train/loop.py builds it: for
the 8-device tests (test_sharding, test_moe_sharding, test_context), imported inside their
subprocess scripts (XLA_FLAGS must be set before jax is imported)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from dpojax import model as model_lib
from dpojax.train import compiled, sharding
from dpojax.train import step as step_lib


def sharded_step(step_cfg, tx, schedule, shape, devices, batch, axes=sharding.AXES):
  """(mesh, cfg, fn, state, ref): fresh parameters (key 0) placed on the mesh whose `axes`
  have the sizes `shape`; `batch` fixes the shapes compiled."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(axes, shape))), devices)
  cfg = dataclasses.replace(step_cfg, mesh=mesh)  # As the loop does.
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  state = step_lib.init_state(params, tx)
  fn, _, state_sh, ref_sh = compiled.compile_steps(cfg, tx, schedule, state, params, mesh, batch)
  ref = jax.device_put(jax.tree.map(jnp.copy, params), ref_sh)
  return mesh, cfg, fn, jax.device_put(state, state_sh), ref
