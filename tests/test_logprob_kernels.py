"""The log-prob implementations against `xla` and an independent float64 formula.

Values and cotangents (any per-token cotangent g) with respect to hidden and out_weight, on
vocab sizes that no block divides, with masked tokens; pallas runs in interpret mode.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax.ops import logprob as lp
from dpojax.ops import logprob_chunked

from conftest import ROOT


def make_case(seed, b, t, d, v, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, t, d))
  w = rng.normal(size=(v, d)) * 2 / np.sqrt(d)  # Logits of order 2: a non-flat softmax.
  targets = rng.integers(0, v, size=(b, t))
  targets[0, :3] = [v - 1, v - 2, 0]  # The ragged last vocab block and the first.
  mask = rng.random((b, t)) > 0.3
  mask[0, :3] = True
  mask[-1, -2:] = False
  g = rng.normal(size=(b, t))  # Nonzero at masked tokens too: they must still give nothing.
  return (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(targets, jnp.int32),
          jnp.asarray(mask), jnp.asarray(g, jnp.float32))


def float64_reference(h, w, targets, mask, g, cap=None):
  """log p(target) and the cotangents of sum(g * log p), from the textbook formulas; with
  `cap`, of the capped logits c * tanh(z / c) (chain rule: times 1 - tanh^2)."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  d, t, m = h.shape[-1], np.asarray(targets).reshape(-1), np.asarray(mask).reshape(-1)
  z = h.reshape(-1, d) @ w.T
  chain = 1.0
  if cap:
    chain = 1.0 / np.cosh(z / cap) ** 2  # d/dz c tanh(z / c).
    z = cap * np.tanh(z / cap)
  zmax = z.max(axis=1, keepdims=True)
  lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
  rows = np.arange(len(t))
  logp = np.where(m, z[rows, t] - lse, 0.0)
  onehot = np.zeros_like(z)
  onehot[rows, t] = 1.0
  dz = np.where(m, np.asarray(g).reshape(-1), 0.0)[:, None] * (onehot - np.exp(z - lse[:, None]))
  dz = dz * chain
  return logp.reshape(targets.shape), (dz @ w).reshape(h.shape), dz.T @ h.reshape(-1, d)


@functools.cache
def value_and_vjp(impl, token_block=None, vocab_block=None, softcap=None):
  """jit(logp and the vjp of a per-token cotangent g), compiled once per impl and shape."""
  def fn(h, w, targets, mask, g):
    f = lambda h, w: lp.logprob(h, w, targets, mask, impl=impl, token_block=token_block,
                                vocab_block=vocab_block, softcap=softcap)
    logp, vjp = jax.vjp(f, h, w)
    return (logp, *vjp(g))
  return jax.jit(fn)


def assert_close(actual, expected, tol):
  for name, a, e in zip(("logp", "d_hidden", "d_out_weight"), actual, expected):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, np.abs(e).max()),
                               err_msg=name)


def test_xla_matches_float64_formula():
  case = make_case(0, 3, 5, 16, 517)
  assert_close(value_and_vjp("xla")(*case), float64_reference(*case), 1e-5)


# (V, D, token block, vocab block): V=1003 and 517 leave a ragged last vocab block of 128;
# token blocks of 7 and 16 leave a ragged last token block of the 2 x 11 = 22 tokens.
SHAPES = [(1003, 16, 16, 128), (517, 24, 7, 128)]


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("v,d,tb,vb", SHAPES)
def test_matches_xla_fp32(impl, v, d, tb, vb):
  case = make_case(1, 2, 11, d, v)
  expected = value_and_vjp("xla")(*case)
  assert_close(value_and_vjp(impl, tb, vb)(*case), expected, 1e-5)
  assert_close(expected, float64_reference(*case), 1e-5)


SOFTCAP = 1.5  # Logits of order 2 (make_case): well inside tanh's bend.


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
def test_final_logit_softcap_matches_float64_and_the_full_logits(impl):
  """Gemma 2's final_logit_softcapping inside the fused paths: values and both cotangents
  equal the full-logits path and the float64 chain rule, on ragged token and vocab blocks."""
  case = make_case(9, 2, 11, 16, 1003)
  reference = float64_reference(*case, cap=SOFTCAP)
  actual = value_and_vjp(impl, 16, 128, SOFTCAP)(*case)
  assert_close(actual, reference, 1e-5)
  assert_close(actual, value_and_vjp("xla", softcap=SOFTCAP)(*case), 1e-5)
  # The cap changes the answer (a no-op cap would pass the lines above for a wrong reason).
  plain = float64_reference(*case)
  assert np.abs(np.asarray(actual[0]) - plain[0]).max() > 0.1


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_matches_xla_bf16(impl):
  case = make_case(2, 2, 11, 32, 1003, dtype=jnp.bfloat16)
  expected = value_and_vjp("xla")(*case)
  actual = value_and_vjp(impl, 16, 128)(*case)
  assert actual[1].dtype == actual[2].dtype == jnp.bfloat16
  # Products of bf16 numbers are exact in fp32: the log-probs agree to fp32 rounding; the
  # cotangents are rounded to bf16 (8 bits) once, so agree to a few bf16 ulps.
  np.testing.assert_allclose(np.asarray(actual[0]), np.asarray(expected[0]), atol=1e-5)
  assert_close(actual, expected, 2e-2)
  reference = float64_reference(*case)
  assert_close(actual, reference, 2e-2)


@pytest.mark.parametrize("impl,vb", [("chunked", None), ("pallas", 4096)])
def test_large_vocab_32003(impl, vb):
  """A real-tokenizer-sized vocabulary (32003 = 7 x 4096 + 3331) on a few tokens."""
  case = make_case(3, 2, 4, 16, 32003)
  assert_close(value_and_vjp(impl, None, vb)(*case), value_and_vjp("xla")(*case), 1e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
def test_masked_tokens_contribute_exactly_nothing(impl):
  h, w, targets, mask, g = make_case(4, 2, 11, 16, 517)
  fn = value_and_vjp(impl, 16, 128)
  logp, dh, dw = fn(h, w, targets, mask, g)
  masked = ~np.asarray(mask)
  assert masked.sum() >= 4
  assert np.all(np.asarray(logp)[masked] == 0) and np.all(np.asarray(dh)[masked] == 0)
  # Large finite noise in masked positions moves nothing (NaN would poison dw = dz.T @ h
  # through 0 * NaN, exactly as in the reference).
  noise = np.random.default_rng(5).normal(size=h.shape) * 1e3
  h2 = jnp.where(mask[..., None], h, jnp.asarray(noise, h.dtype))
  t2 = jnp.where(mask, targets, 0)
  logp2, dh2, dw2 = fn(h2, w, t2, mask, g)
  np.testing.assert_array_equal(np.asarray(logp2), np.asarray(logp))
  np.testing.assert_array_equal(np.asarray(dh2), np.asarray(dh))
  np.testing.assert_allclose(np.asarray(dw2), np.asarray(dw), rtol=1e-6, atol=1e-6)
  # Nothing masked in: zero everywhere.
  none = jnp.zeros_like(mask)
  for x in fn(h, w, targets, none, g):
    assert not np.any(np.asarray(x))


def test_pallas_kernels_lower_to_triton_for_gpu():
  """Without a GPU: the Pallas -> Triton lowering accepts both kernels (powers of two,
  supported ops) for fp32 and bf16; compiling Triton to PTX needs the GPU."""
  from dpojax.ops import logprob_pallas

  n, d, v = 96, 80, 1003  # Ragged tokens (pads to 128), D (K-loop of 16), V.
  for dtype in (jnp.float32, jnp.bfloat16):
    specs = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype),
             jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_),
             jax.ShapeDtypeStruct((n,), jnp.float32))

    def fn(h, w, t, m, g):
      f = lambda h, w: logprob_pallas.pallas_logprob(h, w, t, m, interpret=False)
      logp, vjp = jax.vjp(f, h, w)
      return logp, vjp(g)

    hlo = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 2, dtype  # Forward and backward kernels.


def test_chunked_never_materialises_token_by_vocab():
  """XLA's own memory analysis: xla's scratch holds [N, V] fp32; chunked's a few tiles."""
  n, d, v = 512, 32, 4099
  specs = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
           jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_),
           jax.ShapeDtypeStruct((n,), jnp.float32))
  temp = {}
  for impl in ("xla", "chunked"):
    loss = lambda h, w, t, m, g, impl=impl: jnp.sum(
        g * lp.logprob(h, w, t, m, impl=impl, token_block=64, vocab_block=512))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*specs).compile()
    temp[impl] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["xla"] >= n * v * 4
  assert temp["chunked"] < n * v * 4 / 16, temp


def test_impl_names_and_errors():
  assert lp.resolve_impl("auto") == "chunked"  # This suite runs on CPU.
  case = make_case(6, 1, 4, 16, 40)
  with pytest.raises(ValueError, match=r"logprob.impl='fused' is not one of"):
    lp.logprob(*case[:4], impl="fused")
  with pytest.raises(ValueError, match=r"logprob.impl='triton' runs only on an NVIDIA GPU.*"
                                       r"set logprob.impl to 'chunked'"):
    lp.logprob(*case[:4], impl="triton")
  assert "jax_triton" not in sys.modules
  with pytest.raises(ValueError, match="disagree on D"):
    lp.logprob(case[0], case[1][:, :8], case[2], case[3])


VOCAB_PARALLEL = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from dpojax.ops import logprob as lp
    from test_logprob_kernels import make_case

    h, w, t, m, g = make_case(7, 4, 6, 16, 1004)  # 251 rows per shard: ragged 128-blocks.
    def fn(h, w, **kw):
      f = lambda h, w: lp.logprob(h, w, t, m, vocab_block=128, **kw)
      logp, vjp = jax.vjp(f, h, w)
      return (logp, *vjp(g))
    expected = jax.jit(lambda h, w: fn(h, w, impl="xla"))(h, w)
    for kind, token_axes in ((AxisType.Explicit, "data"), (AxisType.Auto, None)):
      mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(kind, kind))
      hs = jax.device_put(h, NamedSharding(mesh, P(token_axes)))
      ws = jax.device_put(w, NamedSharding(mesh, P("tensor")))
      f = jax.jit(lambda h, w: fn(h, w, impl="chunked", mesh=mesh, token_axes=token_axes))
      hlo = f.lower(hs, ws).compile().as_text()
      assert "all-gather" not in hlo  # w's rows never leave their shard.
      actual = f(hs, ws)
      assert actual[2].sharding.spec[0] == "tensor", actual[2].sharding
      for name, a, e in zip(("logp", "dh", "dw"), actual, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{kind} {name}")
    # A final-logit softcap, applied on each shard's tiles (the last, Auto mesh).
    capped = jax.jit(lambda h, w: fn(h, w, impl="xla", softcap=1.5))(h, w)
    actual = jax.jit(lambda h, w: fn(h, w, impl="chunked", mesh=mesh, softcap=1.5))(hs, ws)
    assert np.abs(np.asarray(capped[0]) - np.asarray(expected[0])).max() > 0.1
    for name, a, e in zip(("logp", "dh", "dw"), actual, capped):
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5,
                                 err_msg=f"softcap {name}")
    try:
      lp.logprob(h, w[:1003], t, m, impl="chunked", mesh=mesh)
    except ValueError as e:
      assert "vocab size 1003 is not a multiple of mesh axis 'tensor' (4)" in str(e), e
    else:
      raise AssertionError("no error for a vocab that the mesh does not divide")
    print("OK")
""")


def test_vocab_parallel_chunked_on_8_devices():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
  proc = subprocess.run([sys.executable, "-c", VOCAB_PARALLEL], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def synthetic_pairs(n, vocab, seed):
  """Tokenized pairs as the data pipeline hands them to `collate` (no tokenizer needed)."""
  rng = np.random.default_rng(seed)
  pairs = []
  for i in range(n):
    prompt = list(rng.integers(1, vocab, size=rng.integers(3, 9)))
    pairs.append(dict(
        line=i + 1, prompt_len=len(prompt), chosen_reward=None, rejected_reward=None,
        chosen=prompt + list(rng.integers(1, vocab, size=rng.integers(2, 15))),
        rejected=prompt + list(rng.integers(1, vocab, size=rng.integers(2, 15)))))
  return pairs


@pytest.mark.slow
def test_dpo_training_chunked_equals_xla(monkeypatch):
  """Three optimizer steps (2 micro-batches each) with chunked give xla's parameters."""
  from dpojax import model as model_lib
  from dpojax.data import batching, pipeline
  from dpojax.train import step as step_lib

  from conftest import tiny_config

  # Small blocks so the 384-token vocabulary and the 4 x 24-token micro-batches are ragged.
  monkeypatch.setattr(logprob_chunked, "TOKEN_BLOCK", 40)
  monkeypatch.setattr(logprob_chunked, "VOCAB_BLOCK", 100)
  config = tiny_config()
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  opts = pipeline.DataOptions.from_config(config.data)
  batch = batching.collate(synthetic_pairs(4, model_cfg.vocab_size, 0), micro_batch_size=2,
                           seq_len=24, opts=opts)
  # Random parameters without compiling the Flax init: shapes only, then numpy draws.
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(lambda key: model_lib.init_params(model_cfg, key), jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype), shapes)
  ref = jax.tree.map(jnp.copy, params)
  tx, schedule = step_lib.make_optimizer(config.train)
  results = {}
  for impl in ("xla", "chunked"):
    cfg = step_lib.StepConfig(model=model_cfg, beta=config.dpo.beta, logprob_impl=impl)
    step = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, tx=tx, schedule=schedule))
    state = step_lib.init_state(params, tx)
    for _ in range(3):
      state, metrics = step(state, ref, batch)
    results[impl] = state, metrics
  (s_xla, m_xla), (s_chunked, m_chunked) = results["xla"], results["chunked"]
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s_xla.params, params)
  assert max(jax.tree.leaves(moved)) > 1e-4  # Training happened (step 0 has lr 0).
  assert float(m_xla["accuracy"]) > 0  # Policy and reference differ by the last step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               s_xla.params, s_chunked.params)
  for key in m_xla:
    np.testing.assert_allclose(m_chunked[key], m_xla[key], rtol=1e-5, atol=1e-5, err_msg=key)


TRITON_INTERPRETED = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np, torch
    from dpojax.ops import logprob_triton as lt
    from test_logprob_kernels import make_case, float64_reference

    h, w, t, m2, g = (np.asarray(x) for x in make_case(8, 2, 25, 40, 1003))
    n, d, v = 50, 40, 1003  # Ragged everywhere: 50 tokens / 16, D 40 / 64, V / 128.
    # As the wrapper calls them: masked-in tokens first; later token blocks are skipped.
    m = m2.reshape(-1)
    perm = np.argsort(~m, kind="stable")
    count = int(m.sum())
    assert count < 48  # The fourth token block holds none: its programs must do nothing.
    fwd, bwd = lt.kernels()
    T = lambda x, dt=np.float32: torch.from_numpy(np.ascontiguousarray(x, dt))
    h_p, t_p = h.reshape(n, d)[perm], t.reshape(-1)[perm]
    count_t = T([count], np.int32)
    for cap in (None, 1.5):  # Without and with a final-logit softcap.
      logp, dh, dw = float64_reference(h, w, t, m2, g, cap=cap)
      meta = lt.plan(n, v, d, token_block=16, vocab_block=128, cap=cap)
      nt, nv = -(-n // meta["BN"]), -(-v // meta["BV"])
      per_split = 3
      splits = -(-nv // per_split)
      parts = [torch.zeros((splits, n)) for _ in range(3)]
      fwd[(nt, splits)](count_t, T(h_p), T(w), T(t_p, np.int32), *parts, PER_SPLIT=per_split,
                        **meta)
      mx, s, tgt = (p.numpy() for p in parts)
      top = mx.max(0)
      lse = top + np.log((s * np.exp(mx - top)).sum(0))
      assert np.all(s[:, 48:] == 0)  # Never written.
      np.testing.assert_allclose(tgt.sum(0)[:count] - lse[:count],
                                 logp.reshape(-1)[perm][:count], atol=1e-5)
      coef = np.where(m, g.reshape(-1), 0)[perm]
      dh_t, dw_t = torch.zeros((n, d)), torch.zeros((v, d))
      bwd[(nt, nv)](count_t, T(h_p), T(w), T(t_p, np.int32), T(coef),
                    T(np.where(np.arange(n) < count, lse, 0)), dh_t, dw_t, **meta)
      np.testing.assert_allclose(dh_t.numpy(), dh.reshape(n, d)[perm], atol=1e-5)
      np.testing.assert_allclose(dw_t.numpy(), dw, atol=1e-5)
    print("OK")
""")


def test_triton_kernels_in_triton_cpu_interpreter():
  """The jax-triton kernels themselves, run by Triton's CPU interpreter on torch tensors."""
  pytest.importorskip("triton", reason="triton not installed (pip install triton)")
  pytest.importorskip("torch", reason="torch not installed")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
  proc = subprocess.run([sys.executable, "-c", TRITON_INTERPRETED], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
