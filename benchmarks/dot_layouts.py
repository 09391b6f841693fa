"""Which operand layouts XLA's CPU dot runs without copying: a batched [M, K] x [K, N] product
with each operand stored either way round.

  python benchmarks/dot_layouts.py

Shapes are one chunk of the block-sparse attention (128 products of 64 x 32 by 32 x 32). The
first operand goes through an exponential, as a score tile does. Prints the median time of
each layout and whether XLA compiled it to YNNPACK's native product; where the first operand
contracts its first axis ("km") XLA instead emits a slower generic dot.
Why the attention paths keep their scores key-major in the backward pass (BUILD.md, stop 19).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=200)
  args = p.parse_args()
  b, m, n, k = 128, 64, 32, 32
  layouts = {"mk,nk": ("bmk,bnk->bmn", (b, m, k), (b, n, k)),
             "mk,kn": ("bmk,bkn->bmn", (b, m, k), (b, k, n)),
             "km,kn": ("bkm,bkn->bmn", (b, k, m), (b, k, n)),
             "km,nk": ("bkm,bnk->bmn", (b, k, m), (b, n, k))}
  for name, (eq, shape_a, shape_b) in layouts.items():
    x = jax.random.normal(jax.random.key(0), shape_a)
    y = jax.random.normal(jax.random.key(1), shape_b)
    f = jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, jnp.exp(x), y))
    hlo = f.lower(x, y).compile().as_text()
    kind = "YNNPACK (native)" if "__ynn_fusion" in hlo else "generic dot"
    f(x, y).block_until_ready()
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      f(x, y).block_until_ready()
      times.append(time.perf_counter() - start)
    print(f"{name}: {statistics.median(times) * 1e6:.0f} us, {kind}")


if __name__ == "__main__":
  main()
