"""Expert parallelism (train/sharding.py's `expert` axis, ops/grouped.expert_parallel) on 8
emulated CPU devices: 3 DPO steps of a tiny MoE model (8 experts, top-2, aux loss on) give the
single-device losses and parameters on meshes with expert = 2, 4, 8 and expert x fsdp x data;
the compiled step holds the all-to-all and no [tokens, experts, ffn] intermediate.

Runs in a subprocess: XLA_FLAGS must be set before jax is imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT

# (data, fsdp, tensor, expert).
MESHES = [(4, 1, 1, 2), (2, 1, 1, 4), (1, 1, 1, 8), (2, 2, 1, 2)]
EXPERTS, FFN = 8, 24

SCRIPT = textwrap.dedent("""
    import dataclasses, json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections
    jax.config.update("jax_enable_x64", %(x64)s)
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    import mesh_steps
    from dpojax import model as model_lib
    from dpojax.data import batching
    from dpojax.train import build as build_lib, compiled, sharding, step as step_lib

    config = tiny_config()
    config.model.moe.num_experts = %(experts)d
    config.model.moe.top_k = 2
    config.model.moe.ffn_hidden_size = %(ffn)d
    config.model.moe.aux_loss_coef = 0.1
    config.model.moe.tile = 4
    config.model.dtype = config.model.param_dtype = "%(dtype)s"
    config.train.global_batch_size = 8
    config.train.micro_batch_size = 4
    config.train.learning_rate = 1e-2
    config.train.warmup_steps = 0
    _, train_data, _, step_cfg = build_lib.build(config)
    batches = [batching.collate([train_data[i] for i in range(8 * s, 8 * s + 8)],
                                micro_batch_size=4, seq_len=48, opts=train_data.opts)
               for s in range(3)]
    tx, schedule = step_lib.make_optimizer(config.train)

    def train(shape, devices):
      mesh, cfg, fn, state, ref = mesh_steps.sharded_step(step_cfg, tx, schedule, shape, devices,
                                                          batches[0])
      hlo = fn.lower(state, ref, sharding.global_batch(batches[0], mesh)).compile().as_text()
      metrics = []
      for b in batches:
        state, m = fn(state, ref, sharding.global_batch(b, mesh))
        metrics.append({k: np.asarray(v).tolist() for k, v in m.items()})
      shards = list(state.params["layers"]["moe"]["experts_fc1"].addressable_shards[0].data.shape)
      shapes = sorted(set(re.findall(r"[a-z0-9]+\\[([0-9,]+)\\]", hlo)))
      return state, metrics, hlo.count("all-to-all"), shards, shapes

    single, single_metrics, _, _, _ = train((1, 1, 1, 1), jax.devices()[:1])
    out = {"devices": jax.device_count(), "single_metrics": single_metrics, "cases": {}}
    for shape in %(meshes)s:
      state, metrics, all_to_all, shards, shapes = train(tuple(shape), jax.devices())
      # Per leaf: |difference| / |single-device leaf| (Frobenius norms), and max |difference|.
      rel = jax.tree.map(lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) /
                                            np.linalg.norm(np.asarray(b))),
                         state.params, single.params)
      absolute = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                              state.params, single.params)
      out["cases"][str(tuple(shape))] = {
          "max_param_rel_diff": max(jax.tree.leaves(rel)),
          "max_param_diff": max(jax.tree.leaves(absolute)), "metrics": metrics,
          "all_to_all": all_to_all, "expert_shard": shards, "shapes": shapes,
          "leaf_diffs": {jax.tree_util.keystr(k): v for k, v in
                         jax.tree_util.tree_flatten_with_path(rel)[0]}}
    print("RESULT" + json.dumps(out))
""")


def _run(meshes, dtype):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = SCRIPT % {"meshes": meshes, "experts": EXPERTS, "ffn": FFN, "dtype": dtype,
                     "x64": dtype == "float64"}
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def runs():
  return _run(MESHES, "float32")


@pytest.mark.slow
def test_expert_meshes_give_the_single_device_parameters_in_float64():
  """The issue's 1e-6 relative on parameters, where summation order stops mattering: in
  float64 every mesh's parameters agree to ~5e-15 relative (measured), its losses to 1e-10."""
  runs = _run(MESHES, "float64")
  for shape, case in runs["cases"].items():
    assert case["max_param_rel_diff"] <= 1e-6, (shape, case["max_param_rel_diff"])
    assert case["all_to_all"] >= 4, shape
    for got, want in zip(case["metrics"], runs["single_metrics"]):
      np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-10, err_msg=shape)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_expert_parallel_training_equals_single_device(runs, shape):
  assert runs["devices"] == 8
  case = runs["cases"][str(tuple(shape))]
  # Parameters after 3 AdamW steps: the bound of tests/test_sharding.py (1e-5 absolute), and
  # 1e-5 relative (Frobenius, per leaf). A plain data-parallel mesh of the same model is as
  # far off (2e-6 relative on the experts): AdamW turns fp32 summation-order differences in
  # near-zero gradient elements into differences of a fraction of the learning rate.
  assert case["max_param_diff"] <= 1e-5, case["max_param_diff"]
  assert case["max_param_rel_diff"] <= 1e-5, case["max_param_rel_diff"]
  for got, want in zip(case["metrics"], runs["single_metrics"]):
    for key in ("loss", "moe_aux_loss"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-6, err_msg="grad")
  losses = [m["loss"] for m in runs["single_metrics"]]
  assert losses[-1] < losses[0]  # It trains.
  # Each device holds its experts only: [layers, E / expert, D / fsdp, 2, F].
  assert case["expert_shard"][1] == EXPERTS // shape[3]
  # Dispatch and combine (and their transposes) are all-to-alls; no [tokens, E, F] product.
  assert case["all_to_all"] >= 4
  for dims in case["shapes"]:
    d = [int(x) for x in dims.split(",") if x]
    assert not (EXPERTS in d and FFN in d and any(x % 48 == 0 for x in d)), dims
