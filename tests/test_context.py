"""The context axis (ops/context_attention.py, its layout in train/sharding.py, the log-prob
reduction in train/logps.py): a row split over 2, 4 or 8 emulated CPU devices, alone and with
FSDP and tensor parallelism, trains as on one device.

Multi-device cases run in subprocesses: XLA_FLAGS must be set before jax is imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tolerance
from conftest import ROOT, tiny_config
from dpojax.ops import context_attention
from dpojax.train import loop
from dpojax.train.metrics import TIMING_METRICS

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _run(script: str) -> dict:
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT"):])


def test_mirrored_order_gives_device_d_chunks_d_and_its_mirror():
  order = context_attention.mirrored_order(16, 4)  # Chunks of 2 tokens, 8 chunks.
  np.testing.assert_array_equal(order.reshape(4, 4) // 2,
                                [[0, 0, 7, 7], [1, 1, 6, 6], [2, 2, 5, 5], [3, 3, 4, 4]])
  assert sorted(order.tolist()) == list(range(16))
  with pytest.raises(ValueError, match="2 x 3 context chunks"):
    context_attention.mirrored_order(16, 3)


@pytest.mark.parametrize("c", [2, 4, 8])
def test_causal_rows_balance_attention_work(c):
  """Per-device attention FLOPs (True query-key entries, and the blocks the kernel computes)
  for one causal sequence per row: every device does the same number of blocks, and the
  products that count differ by under 10% (the mirror pairs a short chunk with a long one).
  The naive contiguous split would give device C-1 about 2C-1 times device 0's work."""
  t = 64 * c
  ids = np.ones((2, t), np.int32)
  order = context_attention.mirrored_order(t, c)
  positions = np.broadcast_to(order, (2, t))  # One sequence: positions are the token index.
  blocks, entries = context_attention.block_work(ids, positions, c)
  assert (blocks == 2 * c + 1).all(), blocks
  assert entries.sum() == 2 * t * (t + 1) // 2  # Every causal (query, key) pair, once.
  assert entries.max() / entries.min() - 1 < 0.10, entries
  # The same rows split contiguously (chunk d on device d): what the mirror avoids.
  naive = [(np.arange(d * t // c, (d + 1) * t // c) + 1).sum() for d in range(c)]
  assert naive[-1] / naive[0] > c


def test_packed_rows_skip_blocks_without_a_shared_segment():
  """Two sequences per row, each 2 chunks long: the blocks pairing one sequence's queries
  with the other's keys are skipped (and counted as such)."""
  c, t = 2, 32  # 4 chunks of 8 tokens; sequence 1 = chunks 0-1, sequence 2 = chunks 2-3.
  ids_orig = np.repeat([[1, 2]], 16, axis=1)
  pos_orig = np.tile(np.arange(16), 2)[None]
  order = context_attention.mirrored_order(t, c)
  blocks, entries = context_attention.block_work(ids_orig[:, order], pos_orig[:, order], c)
  # Causal blocks: 10 (q >= k chunk); those across sequences (q in 2-3, k in 0-1): 4.
  assert blocks.sum() == 10 - 4
  assert entries.sum() == 2 * (16 * 17 // 2)


OP_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from dpojax.ops import attention as A, context_attention as CA
    from dpojax.train import sharding
    rng = np.random.default_rng(0)
    B, T, N, G, K = 4, 64, 4, 2, 8
    q, k, v, w = (jnp.asarray(rng.normal(size=(B, T, h, K)), jnp.float32) for h in (N, G, G, N))
    seg, pos, branch = (np.zeros((B, T), np.int32) for _ in range(3))
    for b in range(B):  # Packed rows: 3-4 sequences, then padding; row 0 shares a prompt.
      cuts = [0] + sorted(rng.choice(np.arange(1, T - 4), 3, replace=False).tolist()) + [T - 3]
      for i, (s, e) in enumerate(zip(cuts[:-1], cuts[1:])):
        seg[b, s:e], pos[b, s:e] = i + 1, np.arange(e - s)
    # Row 0: one shared-prompt segment [prompt 10 | branch 1: 12 | branch 2: 9].
    seg[0, :31], branch[0, :31] = 1, [0] * 10 + [1] * 12 + [2] * 9
    pos[0, :31] = list(range(10)) + list(range(10, 22)) + list(range(10, 19))
    seg[0, 31:] = 0
    out = {}
    for data, fsdp, c, tensor, window, cap, block in [
        (-1, 1, 2, 1, 5, 0.0, 512), (-1, 1, 4, 1, 0, 3.0, 512), (1, 1, 8, 1, 7, 2.0, 512),
        (-1, 2, 2, 2, 5, 3.0, 512), (-1, 1, 2, 1, 5, 2.0, 4)]:
      CA.BLOCK = block  # 4: blocks of 4 queries x 4 keys inside the chunks of 16.
      mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(
          data=data, fsdp=fsdp, context=c, tensor=tensor)))
      lay = lambda x: sharding.to_context_layout(x, c, 1)
      def dense(q, k, v):
        m = A.attention_mask(jnp.asarray(seg), jnp.asarray(branch), jnp.asarray(pos), window)
        return A.attend(q, k, v, m, 0, None, cap)
      def ctx(q, k, v):
        m = CA.ContextMask(*(jnp.asarray(lay(x)) for x in (seg, pos, branch)), window, mesh)
        return sharding.from_context_layout(CA.attention(lay(q), lay(k), lay(v), m, None, cap),
                                            c, 1)
      f = lambda fn: jax.jit(jax.value_and_grad(
          lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))
      (_, want), (_, got) = f(dense)(q, k, v), f(ctx)(q, k, v)
      o1, o2 = jax.jit(dense)(q, k, v), jax.jit(ctx)(q, k, v)
      out[str((data, fsdp, c, tensor, block))] = {
          "out": float(jnp.abs(o1 - o2).max()), "out_scale": float(jnp.abs(o1).max()),
          "grads": [float(jnp.abs(a - b).max()) for a, b in zip(got, want)],
          "grad_scale": [float(jnp.abs(a).max()) for a in want]}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_context_attention_equals_dense_attention():
  """Outputs and q/k/v gradients of the context path equal the dense masked attention's
  (packed rows, a shared-prompt row, sliding windows, softcaps, GQA; C = 2, 4, 8 and C x
  FSDP x tensor; and blocks smaller than the chunks). Bound: two orders of the softmax's sums over T = 64 keys (and, for the
  gradients, over T queries x N = 4 heads), in fp32, of terms up to the result's scale."""
  res = _run(OP_SCRIPT)
  assert len(res) == 5
  for case, r in res.items():
    assert r["out"] <= tolerance.sum_tolerance(64, r["out_scale"]), (case, r)
    for got, scale in zip(r["grads"], r["grad_scale"]):
      assert got <= tolerance.sum_tolerance(64 * 4, scale), (case, r)


TRAIN_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    import mesh_steps
    import tolerance
    from dpojax import model as model_lib
    from dpojax.data import batching
    from dpojax.ops import context_attention
    from dpojax.train import build as build_lib, compiled, sharding, step as step_lib
    from dpojax.train import logps as logps_lib

    VARIANTS = {
        # Packed rows, local + global layers (window 6), softcapped attention logits, GQA.
        "window": dict(layer_types=("sliding_attention", "full_attention"), sliding_window=6,
                       attention_softcap=20.0, share_prompt=False),
        # Packed shared-prompt rows ([prompt | chosen | rejected] per pair, branch ids).
        "shared": dict(layer_types=None, sliding_window=0, attention_softcap=0.0,
                       share_prompt=True),
    }
    MESHES = %(meshes)s  # Per variant: (data, fsdp, context, tensor)

    def setup(variant):
      v = VARIANTS[variant]
      config = tiny_config()
      config.model.num_layers = 2
      config.model.num_attention_heads = 4
      config.model.num_query_groups = 2
      if v["layer_types"]:
        config.model.layer_types = v["layer_types"]
      config.model.sliding_window = v["sliding_window"]
      config.model.attention_softcap = v["attention_softcap"]
      config.data.packing = "first_fit_decreasing"
      config.data.pack_size = 96
      config.data.share_prompt = v["share_prompt"]
      config.train.global_batch_size = 4  # Rows when packing: 2 micro-batches of 2.
      config.train.micro_batch_size = 2
      _, train_data, _, step_cfg = build_lib.build(config)
      it = iter(batching.train_dataset(train_data, global_batch_size=4, micro_batch_size=2,
                                       seed=0))
      batches = [next(it) for _ in range(3)]
      return config, step_cfg, batches

    def crossings(batches, c):
      # Sequences (segments) whose tokens lie in more than one of the 2C chunks of a row.
      n = 0
      for b in batches:
        seg = b["segment_ids"].reshape(-1, b["segment_ids"].shape[-1])
        s = seg.shape[1] // (2 * c)
        for row in seg:
          for i in set(row[row > 0].tolist()):
            idx = np.nonzero(row == i)[0]
            n += int(idx[0] // s != idx[-1] // s)
      return n

    def train(config, step_cfg, batches, shape, devices):
      tx, schedule = step_lib.make_optimizer(config.train)
      mesh, cfg, fn, state, ref = mesh_steps.sharded_step(step_cfg, tx, schedule, shape, devices,
                                                          batches[0], sharding.MESH_AXES)
      c = sharding.context_size(mesh)

      @jax.jit
      def probe(params, batch):  # Per-sequence log-probs and the gradient of micro-batch 0.
        micro = jax.tree.map(lambda x: x[0], batch)
        logps = jnp.concatenate([logps_lib.sequence_logps(params, jax.tree.map(
            lambda x: x[a], batch), cfg)["logps"] for a in range(len(batch["tokens"]))])
        grads = jax.grad(lambda p: step_lib.micro_loss(p, ref, micro, cfg, {"pairs": 1.0})[0])(
            params)
        return logps, grads

      metrics, logps, grads = [], [], []
      for b in batches:
        placed = sharding.global_batch(b, mesh)
        lp, g = probe(state.params, placed)
        logps.append(np.asarray(lp).tolist())
        grads.append(jax.tree.map(np.asarray, g))
        state, m = fn(state, ref, placed)
        metrics.append({k: float(v) for k, v in m.items()})
      return state, metrics, logps, grads

    out = {"devices": jax.device_count(), "variants": {}}
    for variant in VARIANTS:
      config, step_cfg, batches = setup(variant)
      single = train(config, step_cfg, batches, (1, 1, 1, 1), jax.devices()[:1])
      params0 = model_lib.init_params(step_cfg.model, jax.random.key(0))
      # Bound on each per-sequence sum (tests/tolerance.py), at the first and last weights.
      counts = np.ones(1) * 96
      bound = float(max(tolerance.logp_tolerance(counts, step_cfg.model, p,
                                                 model_lib.output_weight(p, step_cfg.model), 96)
                        .max() for p in (params0, single[0].params)))
      res = {"logp_bound": bound, "cases": {},
             "has_branches": "branch_ids" in batches[0],
             "single_metrics": single[1]}
      for shape in MESHES[variant]:
        state, metrics, logps, grads = train(config, step_cfg, batches, tuple(shape),
                                             jax.devices()[:int(np.prod(shape))])
        gdiff = max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
                    for g1, g0 in zip(grads, single[3])
                    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
        pdiff = max(jax.tree.leaves(jax.tree.map(
            lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
            state.params, single[0].params)))
        res["cases"][str(tuple(shape))] = {
            "metrics": metrics, "logp_diff": float(np.max(np.abs(
                np.asarray(logps) - np.asarray(single[2])))),
            "grad_rel_diff": gdiff, "param_diff": pdiff,
            "crossings": crossings(batches, shape[2])}
      out["variants"][variant] = res
    print("RESULT" + json.dumps(out))
""")

# Data x context runs in the CLI test below (8 devices, context 4: data 2).
TRAIN_MESHES = {"window": [(1, 1, 2, 1), (1, 1, 8, 1), (1, 2, 4, 1), (1, 2, 2, 2)],
                "shared": [(1, 1, 2, 1), (1, 1, 8, 1), (1, 2, 2, 2)]}


@pytest.fixture(scope="module")
def context_runs():
  return _run(TRAIN_SCRIPT % {"meshes": TRAIN_MESHES})


@pytest.mark.slow
@pytest.mark.parametrize("variant,shape", [(v, s) for v, shapes in TRAIN_MESHES.items()
                                           for s in shapes])
def test_context_training_equals_single_device(context_runs, variant, shape):
  """Three DPO steps on packed rows (sequences crossing chunk borders) with a sliding-window,
  softcapped GQA model, and with shared-prompt rows: per-sequence log-probs (before each
  step), micro-batch gradients, step metrics and the final weights match one device."""
  assert context_runs["devices"] == 8
  res = context_runs["variants"][variant]
  case = res["cases"][str(shape)]
  assert res["has_branches"] == (variant == "shared")
  assert case["crossings"] >= 3, case["crossings"]
  assert case["logp_diff"] <= res["logp_bound"], (case["logp_diff"], res["logp_bound"])
  assert case["grad_rel_diff"] <= 1e-5
  assert case["param_diff"] <= 1e-5
  for got, want in zip(case["metrics"], res["single_metrics"]):
    for key in want:
      if key != "accuracy":
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def _cli(workdir, *flags):
  cmd = [sys.executable, "-m", "dpojax.main", "--config=tests/configs/tiny.py",
         f"--workdir={workdir}", "--config.mesh.context=4", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


@pytest.mark.slow
def test_cli_with_context_4_trains_as_one_device_and_resumes_exactly(tmp_path):
  """`--config.mesh.context=4` on 8 emulated devices (data 2 x context 4): six steps equal the
  one-device run's metrics; three steps, then a resumed run to six, equal the straight run."""
  straight, part = str(tmp_path / "straight"), str(tmp_path / "part")
  out = _cli(straight)
  assert "context over 4 devices" in out and "'context': 4" in out, out
  _cli(part, "--config.train.max_steps=3")
  assert "Resumed from" in _cli(part)
  one = str(tmp_path / "one")
  loop.run(tiny_config(), one)
  a, b, c = _records(straight), _records(part), _records(one)
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in c]
  for ra, rb, rc in zip(a, b, c):
    for key in ra:
      if key not in TIMING_METRICS and key != "split":
        assert rb[key] == ra[key], (ra["step"], key)  # Resumed: bit for bit.
        assert ra[key] == pytest.approx(rc[key], abs=1e-5, rel=1e-5), (ra["step"], key)


@pytest.mark.slow
def test_context_memory_benchmark_smoke():
  """benchmarks/context_memory.py at a tiny size: its table and budget lines print."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/context_memory.py", "--tiny", "--lengths=64",
       "--contexts=1,2", "--budget_gib=0.01", "--max_length=64"],
      cwd=ROOT, env=dict(ENV, XLA_FLAGS=""), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.splitlines()
  row = next(l for l in lines if l.startswith("| 64 |"))
  c1, c2 = (float(x.split()[0]) for x in row.strip("| ").split("|")[1:])
  assert c1 > 0 and c2 >= 0
  assert any(l.startswith("C = 2: T = 64") for l in lines), proc.stdout


@pytest.mark.slow
def test_context_that_does_not_divide_the_devices_is_one_error_line(tmp_path):
  """A bad mesh.context stops the CLI with one `error:` line naming the key, exit 1."""
  cmd = [sys.executable, "-m", "dpojax.main", "--config=tests/configs/tiny.py",
         f"--workdir={tmp_path}", "--config.mesh.context=3"]
  proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "error: mesh.context=3 does not divide 8 devices" in proc.stderr.splitlines()
