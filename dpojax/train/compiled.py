"""The jitted steps of a run, with explicit shardings, and the matmul peak that MFU divides by."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from dpojax.train import sharding
from dpojax.train import step as step_lib


def guarded_train_step(state, ref_params, batch, *, inject_nonfinite_at=(), **step_kwargs):
  """train_step that refuses non-finite updates: when the loss or the gradient norm is not
  finite, parameters and optimizer state stay as they were (the step counter still moves, as
  the batch was consumed) and `nonfinite` is 1. `inject_nonfinite_at` (debug) poisons the
  loss at those steps so that this path can be tested."""
  new, metrics = step_lib.train_step(state, ref_params, batch, **step_kwargs)
  loss = metrics["loss"]
  if inject_nonfinite_at:
    hit = jnp.any(state.step + 1 == jnp.asarray(inject_nonfinite_at))
    loss = jnp.where(hit, jnp.nan, loss)
  ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
  keep = lambda n, o: jnp.where(ok, n, o)
  new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                    opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
  metrics["loss"] = loss
  metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
  return new, metrics


def compile_steps(step_cfg, tx, schedule, state, ref_params, mesh, example_batch,
                  inject_nonfinite_at=()):
  """Jits the train and eval steps once, with explicit shardings; the state is donated.

  `state` and `ref_params` may be abstract (jax.ShapeDtypeStruct trees)."""
  state_sh = sharding.state_shardings(state, mesh)
  ref_sh = sharding.tree_shardings(ref_params, mesh)
  batch_sh = sharding.batch_shardings(example_batch, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train = jax.jit(
      functools.partial(guarded_train_step, cfg=step_cfg, tx=tx, schedule=schedule,
                        inject_nonfinite_at=tuple(inject_nonfinite_at)),
      in_shardings=(state_sh, ref_sh, batch_sh), out_shardings=(state_sh, replicated),
      donate_argnums=(0,))
  # TR-DPO keeps the reference in the state: evaluation then takes the whole state.
  eval_sh = state_sh if getattr(state, "ref", None) is not None else state_sh.params
  evaluate = jax.jit(functools.partial(step_lib.eval_step, cfg=step_cfg),
                     in_shardings=(eval_sh, ref_sh, batch_sh), out_shardings=replicated)
  return train, evaluate, state_sh, ref_sh


def compile_eval_step(step_cfg, params, ref_params, mesh, example_batch):
  """The eval step alone (no optimizer, no train state), jitted as `compile_steps` jits it:
  (eval_fn, params shardings, reference shardings). Trees may be abstract."""
  params_sh = sharding.tree_shardings(params, mesh)
  ref_sh = sharding.tree_shardings(ref_params, mesh)
  batch_sh = sharding.batch_shardings(example_batch, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  evaluate = jax.jit(functools.partial(step_lib.eval_step, cfg=step_cfg),
                     in_shardings=(params_sh, ref_sh, batch_sh), out_shardings=replicated)
  return evaluate, params_sh, ref_sh


def matmul_peak_flops(n: int | None = None, repeats: int = 3, dtype: str = "float32") -> float:
  """Best FLOP/s of an n^3 product in `dtype` on the first device (the MFU denominator).

  n: None = 8192 on GPU (smaller products do not fill it), 2048 elsewhere. Random operands: a
  product of constants can run faster than real data on GPUs."""
  if n is None:
    n = 8192 if jax.default_backend() == "gpu" else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(jnp.matmul)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best

