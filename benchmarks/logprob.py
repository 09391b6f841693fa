"""Forward+backward memory and time of each log-prob implementation.

For each shape (N tokens, hidden H, vocab V), share of masked-in (predicted) tokens and
implementation, this reports XLA's compiled memory analysis of jit(value_and_grad) of
sum(g * logprob) with respect to hidden and out_weight (temp: scratch beyond arguments and
outputs; compiling allocates nothing) and, where arguments+outputs+temp fit in memory, the
median wall time and process CPU time of a few runs (CPU time moves less than wall time when
other jobs share the machine). TFLOP/s counts 6 N H V useful FLOPs (logits, dh, dw).

  python benchmarks/logprob.py                       # default shapes; xla and chunked on CPU
  python benchmarks/logprob.py --impls=xla,chunked,pallas --shapes=512x256x4099 --masked_in=1
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpojax.ops import logprob as lp

SHAPES = ("16384x2048x128256", "2048x1024x32000")
# 1: every token predicted (chunked's worst case); 0.27: the response share of the tokens of
# hh-rlhf harmless-base test pairs (prompt tokens are masked; padding would lower it further).
MASKED_IN = ("1", "0.27")


def _cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def fwd_bwd(impl, token_block, vocab_block):
  def loss(h, w, t, m, g):
    return jnp.sum(g * lp.logprob(h, w, t, m, impl=impl, token_block=token_block,
                                  vocab_block=vocab_block))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def make_data(n, h, v, dtype, masked_in):
  """Random hidden / weights (logits of order 1); each row's last `masked_in` share is the
  response, as in a DPO sequence."""
  rng = np.random.default_rng(0)
  mask = (np.arange(n) % 2048) >= (1 - masked_in) * min(n, 2048)
  return (jnp.asarray(rng.normal(size=(n, h)), dtype),
          jnp.asarray(rng.normal(size=(v, h)) / np.sqrt(h), dtype),
          jnp.asarray(rng.integers(0, v, size=n), jnp.int32), jnp.asarray(mask),
          jnp.asarray(rng.normal(size=n), jnp.float32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default=",".join(SHAPES), help="NxHxV,...")
  parser.add_argument("--masked_in", default=",".join(MASKED_IN),
                      help="shares of predicted tokens to time, comma-separated")
  parser.add_argument("--impls", default=None,
                      help="comma list; default xla,chunked (+pallas,triton on GPU; pallas "
                           "elsewhere runs interpreted: very slow)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--token_block", type=int, default=None)
  parser.add_argument("--vocab_block", type=int, default=None)
  parser.add_argument("--max_gib", type=float, default=None,
                      help="time only where arguments+outputs+temp fit (default: half the RAM "
                           "on CPU, no limit elsewhere)")
  parser.add_argument("--max_tflop", type=float, default=None,
                      help="time only shapes with 8 N H V below this (default: 2 on CPU, where "
                           "the full-size shape takes about 10 minutes a run; none elsewhere)")
  args = parser.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  impls = args.impls.split(",") if args.impls else (
      ["xla", "chunked", "pallas", "triton"] if on_gpu else ["xla", "chunked"])
  max_bytes = args.max_gib * 2**30 if args.max_gib else None
  max_tflop = args.max_tflop
  if not on_gpu:
    if max_bytes is None:
      max_bytes = 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if max_tflop is None:
      max_tflop = 2.0
  dtype = jnp.dtype(args.dtype)
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"dtype={dtype.name} cores={os.cpu_count()}")
  print(f"{'N':>6} {'H':>5} {'V':>7} {'impl':>8} {'temp GiB':>9} {'total GiB':>9} "
        f"{'masked_in':>9} {'time s':>8} {'cpu s':>8} {'TFLOP/s':>8}")
  for shape in args.shapes.split(","):
    n, h, v = (int(x) for x in shape.split("x"))
    specs = (jax.ShapeDtypeStruct((n, h), dtype), jax.ShapeDtypeStruct((v, h), dtype),
             jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_),
             jax.ShapeDtypeStruct((n,), jnp.float32))
    for impl in impls:
      head = f"{n:>6} {h:>5} {v:>7} {impl:>8}"
      try:
        compiled = fwd_bwd(impl, args.token_block, args.vocab_block).lower(*specs).compile()
      except Exception as e:  # pylint: disable=broad-except
        print(f"{head}  failed to compile: {str(e).splitlines()[0][:80]}")
        continue
      mem = compiled.memory_analysis()
      temp = mem.temp_size_in_bytes
      total = temp + mem.argument_size_in_bytes + mem.output_size_in_bytes
      head += f" {temp / 2**30:>9.3f} {total / 2**30:>9.3f}"
      if max_bytes is not None and total > max_bytes:
        print(f"{head}  not timed: needs more than --max_gib", flush=True)
        continue
      if max_tflop is not None and 8 * n * h * v / 1e12 > max_tflop:
        print(f"{head}  not timed: more than --max_tflop", flush=True)
        continue
      for masked_in in (float(x) for x in args.masked_in.split(",")):
        data = make_data(n, h, v, dtype, masked_in)
        jax.block_until_ready(compiled(*data))
        times, cpu_times = [], []
        for _ in range(args.runs):
          cpu0, start = _cpu_seconds(), time.perf_counter()
          jax.block_until_ready(compiled(*data))
          times.append(time.perf_counter() - start)
          cpu_times.append(_cpu_seconds() - cpu0)
        secs, cpu_secs = statistics.median(times), statistics.median(cpu_times)
        print(f"{head} {masked_in:>9.2f} {secs:>8.3f} {cpu_secs:>8.3f} "
              f"{6 * n * h * v / secs / 1e12:>8.3f}", flush=True)
        del data


if __name__ == "__main__":
  main()
