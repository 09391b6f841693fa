"""Sharded training equals single-device training, on 8 emulated CPU devices.

Each case runs in a subprocess: XLA_FLAGS must be set before jax is imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]

SCRIPT = textwrap.dedent("""
    import dataclasses, json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    import mesh_steps
    from dpojax import model as model_lib
    from dpojax.data import batching
    from dpojax.train import build as build_lib, compiled, sharding, step as step_lib
    from dpojax.train import logps as logps_lib

    config = tiny_config()
    config.model.num_attention_heads = 4
    config.model.num_query_groups = 2
    config.train.global_batch_size = 8
    config.train.micro_batch_size = 4
    _, train_data, _, step_cfg = build_lib.build(config)
    batches = [batching.collate([train_data[i] for i in range(8 * s, 8 * s + 8)],
                                micro_batch_size=4, seq_len=48, opts=train_data.opts)
               for s in range(5)]
    tx, schedule = step_lib.make_optimizer(config.train)

    @jax.jit
    def pair_margins(params, ref, micro):
      lp = logps_lib.sequence_logps(params, micro, step_cfg)["logps"]
      lr = logps_lib.sequence_logps(ref, micro, step_cfg, policy=False)["logps"]
      return step_cfg.loss.beta * ((lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1]))

    def train(shape, devices):
      mesh, cfg, fn, state, ref = mesh_steps.sharded_step(step_cfg, tx, schedule, shape, devices,
                                                          batches[0])
      metrics, margins = [], []
      for b in batches:
        if shape == (1, 1, 1):  # Each pair's margin as the step sees it, micro-batch by one.
          margins.append(np.concatenate([pair_margins(state.params, ref, jax.tree.map(
              lambda x: jnp.asarray(x[a]), b)) for a in range(len(b["tokens"]))]).tolist())
        state, m = fn(state, ref, sharding.global_batch(b, mesh))
        metrics.append({k: float(v) for k, v in m.items()})
      return state, metrics, bool(logps_lib._vocab_parallel(cfg)), margins

    single, single_metrics, _, margins = train((1, 1, 1), jax.devices()[:1])
    out = {"devices": jax.device_count(), "cases": {}, "margins": margins,
           "learning_rates": [float(schedule(s)) for s in range(len(batches))]}
    # The fp32 bound of a pair's margin (tests/tolerance.py): four sums, policy and reference.
    import tolerance
    counts = np.array([[len(p[side]) - p["prompt_len"] for side in ("chosen", "rejected")]
                       for p in (train_data[i] for i in range(8 * len(batches)))])
    per_seq = np.maximum(*(tolerance.logp_tolerance(counts, step_cfg.model, p, model_lib.output_weight(
        p, step_cfg.model), 48) for p in (model_lib.init_params(step_cfg.model,
                                                                jax.random.key(0)),
                                          single.params)))
    out["margin_bound"] = float(2 * step_cfg.loss.beta * per_seq.sum(1).max())
    for shape in %(meshes)s:
      state, metrics, vocab_parallel, _ = train(tuple(shape), jax.devices())
      diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                          state.params,
                          single.params)
      big = {jax.tree_util.keystr(path): [list(leaf.shape),
             list(leaf.addressable_shards[0].data.shape)]
             for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
             if leaf.size >= 4096}
      out["cases"][str(tuple(shape))] = {
          "max_param_diff": max(jax.tree.leaves(diff)), "metrics": metrics, "shards": big,
          "vocab_parallel": vocab_parallel}
    out["single_metrics"] = single_metrics

    # dense with fc1's weight [D, 2, F] sharded on F over the tensor axis, and its backward.
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dpojax.ops import dense as dense_ops
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    x = jax.device_put(jnp.ones((4, 6, 16)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((16, 2, 8)), NamedSharding(mesh, P(None, None, "tensor")))
    grad = jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(jnp.sin(dense_ops.dense(x, w))), argnums=(0, 1)))
    hlo = grad.lower(x, w).compile().as_text()
    out["dense_tp_collectives"] = sorted(set(re.findall(
        r"all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter", hlo)))
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_runs():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT % {"meshes": MESHES}], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT"):])


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_training_equals_single_device(sharded_runs, shape):
  assert sharded_runs["devices"] == 8
  case = sharded_runs["cases"][str(tuple(shape))]
  assert case["max_param_diff"] <= 1e-5
  # A tensor axis (2 or 4, dividing the vocab of 384) runs the vocab-parallel log-probs.
  assert case["vocab_parallel"] == (shape[2] > 1)
  bound, decided = sharded_runs["margin_bound"], 0
  for step, (got, want, margins) in enumerate(zip(
      case["metrics"], sharded_runs["single_metrics"], sharded_runs["margins"])):
    for key in want:
      if key != "accuracy":
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # Accuracy counts margins > 0, a step function: a pair whose margin lies within the
    # rounding bound of 0 may count either way, depending on how the device mesh sums; the
    # others count the same on every mesh. Where the policy is still the reference (the first
    # learning rates are 0), every margin is such a tie.
    margins = np.asarray(margins)
    if not any(sharded_runs["learning_rates"][:step]):
      assert np.abs(margins).max() <= bound, (step, margins, bound)
    decided += int(np.sum(np.abs(margins) > bound))
    for accuracy in (got["accuracy"], want["accuracy"]):  # Sums over the step's pairs.
      assert np.sum(margins > bound) <= accuracy <= np.sum(margins >= -bound), step
  # A third of the 24 pairs after the ties (11 here): the brackets are a real check.
  assert decided >= 8, (sharded_runs["margins"], bound)
  assert sharded_runs["single_metrics"][-1]["loss"] < sharded_runs["single_metrics"][0]["loss"]


@pytest.mark.slow
def test_dense_keeps_tensor_parallel_fc1_shards(sharded_runs):
  """fc1's gated weight [D, 2, F] with F over 4 tensor devices, through model.dense and its own
  backward: the only collective is dx's all-reduce over the tensor axis. Merging the weight's
  (2, F) axes into one would split each shard and gather the weight instead."""
  assert sharded_runs["dense_tp_collectives"] == ["all-reduce"]


@pytest.mark.slow
def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state(sharded_runs):
  shards = sharded_runs["cases"][str((1, 8, 1))]["shards"]
  params = [k for k in shards if k.startswith(".params")]
  moments = [k for k in shards if ".mu[" in k or ".nu[" in k]
  assert params and len(moments) == 2 * len(params)
  for key in params + moments:
    (full, local) = shards[key]
    assert np.prod(local) * 8 == np.prod(full), (key, full, local)
