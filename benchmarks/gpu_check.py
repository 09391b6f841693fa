"""GPU correctness and speed of the kernels: log-prob implementations and flash attention.

  python benchmarks/gpu_check.py            # on a GPU (runs anywhere, slowly, for a smoke test)

Every check draws fresh random inputs and compares with a float64 NumPy reference by relative
error ||out - ref|| / ||ref|| of the values and both cotangents; fp32 runs under
jax.default_matmul_precision("highest") (no TF32), so fp32 errors should sit near 1e-6 and
bf16 ones between 1e-3 and 1e-2. Then times the attention paths' forward + backward
(median of 10, after warm-up) on packed 4096-token rows: dense XLA, our segment-skipping
flash kernel and JAX's causal segment-masked kernel.
"""

import argparse
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from dpojax.ops import attention as attention_ops
from dpojax.ops import flash_attention
from dpojax.ops import logprob as lp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from test_logprob_kernels import float64_reference  # noqa: E402  (the tests' float64 formula)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_logprob(impls, n, d, v, dtype, seed):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d))
  w = rng.normal(size=(v, d)) * 2 / np.sqrt(d)
  t = rng.integers(0, v, n)
  m = rng.random(n) > 0.3
  g = rng.normal(size=n)
  args = (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(t, jnp.int32),
          jnp.asarray(m), jnp.asarray(g, jnp.float32))
  ref = float64_reference(args[0], args[1], t, m, g)  # Of the inputs as rounded to dtype.
  for impl in impls:
    try:
      def fn(h, w, t, m, g, impl=impl):
        logp, vjp = jax.vjp(lambda h, w: lp.logprob(h, w, t, m, impl=impl), h, w)
        return (logp, *vjp(g))
      with jax.default_matmul_precision("highest"):
        out = jax.jit(fn)(*args)
      errs = [rel(o, r) for o, r in zip(out, ref)]
      nan = any(not np.all(np.isfinite(np.asarray(o, np.float32))) for o in out)
      print(f"logprob {impl:>8} {jnp.dtype(dtype).name:>8} N={n} D={d} V={v}: rel err "
            f"logp {errs[0]:.2e} dh {errs[1]:.2e} dw {errs[2]:.2e}{' NaN!' if nan else ''}",
            flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"logprob {impl:>8} {jnp.dtype(dtype).name:>8} FAILED: {type(e).__name__}: "
            f"{str(e)[:400]}", flush=True)
      traceback.print_exc(limit=3)


def attention_reference(q, k, v, seg):
  """float64 causal same-segment attention, GQA by repeating groups; [B, T, N, K]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  r = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, r, 2), np.repeat(v, r, 2)
  s = np.einsum("btnk,bsnk->bnts", q, k) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  mask = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnk->btnk", p, v)


def attention_case(b, t, n, g, kd, dtype, seed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, kd)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, t, g, kd)), dtype) for _ in range(2))
  seg = np.zeros((b, t), np.int32)
  for row in range(b):  # Random packed segments, then padding.
    pos, sid = 0, 1
    while pos < t - 64:
      length = int(rng.integers(32, t // 2))
      seg[row, pos:pos + length] = sid
      pos, sid = pos + length, sid + 1
  return q, k, v, seg


ATTENTION = ("xla", "flash", "flash_jax")  # Dense; our segment-skipping kernel; JAX's kernel.


def attention_fn(impl):
  def fn(q, k, v, seg, cot):
    if impl == "xla":
      attend = lambda q, k, v: attention_ops.attend(q, k, v, attention_ops.attention_mask(seg))
    else:
      attend = lambda q, k, v: flash_attention.attention(q, k, v, seg,
                                                         jax_kernel=impl == "flash_jax")
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(cot))
  return jax.jit(fn)


def check_attention(t, dtype, seed):
  q, k, v, seg = attention_case(2, t, 8, 2, 64, dtype, seed)
  cot = jnp.asarray(np.random.default_rng(seed + 1).normal(size=q.shape), dtype)
  ref_out = attention_reference(q, k, v, seg)
  # The gradient reference: float64 autodiff of the dense path (checked against the formula
  # by tests/test_model.py).
  with jax.enable_x64(True):
    q64, k64, v64, c64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, cot))
    ref = attention_fn("xla")(q64, k64, v64, jnp.asarray(seg), c64)
    ref = [np.asarray(x) for x in ref]
  assert rel(ref[0], ref_out) < 1e-10
  for impl in ATTENTION:
    try:
      with jax.default_matmul_precision("highest"):
        out = attention_fn(impl)(q, k, v, jnp.asarray(seg), cot)
      errs = [rel(o, r) for o, r in zip(out, ref)]
      print(f"attention {impl:>6} {jnp.dtype(dtype).name:>8} T={t}: rel err out {errs[0]:.2e} "
            f"dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"attention {impl:>6} {jnp.dtype(dtype).name:>8} FAILED: {type(e).__name__}: "
            f"{str(e)[:400]}", flush=True)
      traceback.print_exc(limit=3)


def time_attention(b, t, n, g, kd, dtype):
  q, k, v, seg = attention_case(b, t, n, g, kd, dtype, 11)
  cot = jnp.ones_like(q)
  # Causal forward + backward FLOPs (what a causal kernel without skipping does: 2 products
  # forward, 5 backward with the recomputed scores), and the share inside segments.
  flops = 2 * b * n * t * t * kd / 2 * 7
  inside = sum(int(c) ** 2 for row in seg for c in np.unique(row, return_counts=True)[1])
  print(f"attention time: segments hold {inside / (b * t * t / 2):.1%} of the causal scores",
        flush=True)
  for impl in ATTENTION:
    try:
      fn = attention_fn(impl)
      jax.block_until_ready(fn(q, k, v, jnp.asarray(seg), cot))
      times = []
      for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, jnp.asarray(seg), cot))
        times.append(time.perf_counter() - t0)
      s = statistics.median(times)
      print(f"attention time {impl:>6} B={b} T={t} N={n} G={g} K={kd} {jnp.dtype(dtype).name}: "
            f"{s * 1e3:.2f} ms fwd+bwd, {flops / s / 1e12:.1f} TFLOP/s (causal-equivalent)", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"attention time {impl:>6} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--impls", default="xla,chunked,pallas,triton")
  p.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
  a = p.parse_args()
  print(f"jax {jax.__version__} backend={jax.default_backend()} "
        f"device={jax.devices()[0].device_kind}", flush=True)
  impls = a.impls.split(",")
  if a.small:
    check_logprob(impls, 64, 32, 1003, jnp.float32, 0)
    check_attention(128, jnp.float32, 2)
    return
  check_attention(1024, jnp.bfloat16, 3)
  time_attention(2, 4096, 32, 4, 64, jnp.bfloat16)
  check_logprob(impls, 1024, 2048, 32000, jnp.bfloat16, 1)
  check_attention(1024, jnp.float32, 2)
  check_logprob(impls, 1024, 256, 32003, jnp.float32, 0)


if __name__ == "__main__":
  main()
