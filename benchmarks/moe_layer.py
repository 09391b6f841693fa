"""An MoE layer's forward+backward time against a dense MLP of the same active FLOPs.

  python benchmarks/moe_layer.py                      # 4096 tokens, D 512, 8 experts top-2, F 512
  python benchmarks/moe_layer.py --impls=tiles,ragged --tokens=8192

The MoE layer is model/moe.py's (router, token copies sorted by expert, grouped matmuls,
combine); the dense layer is transformer.Mlp (SwiGLU) with F = top_k x the expert F, so both
do the same matmul FLOPs per token (the router's D x E aside). Routing comes from a random
router, so the experts' loads are uneven as in training. Runs are interleaved and the median
of --repeats is printed, with the ratio MoE / dense per grouped-matmul implementation.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from dpojax.model import moe as moe_lib
from dpojax.model import transformer
from dpojax.model.config import MoeConfig, ModelConfig


def _step(module, cfg, x, valid):
  params = module.init(jax.random.key(0), x, *valid)["params"]

  def loss(p, x):
    y = module.apply({"params": p}, x, *valid)
    y = y[0] if isinstance(y, tuple) else y
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda: jax.block_until_ready(fn(params, x))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--ffn", type=int, default=512, help="each expert's F")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--impls", default="scan,tiles", help="grouped matmuls: scan, tiles, ragged")
  p.add_argument("--tile", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  base = ModelConfig(hidden_size=args.hidden, ffn_hidden_size=args.top_k * args.ffn,
                     dtype=args.dtype, param_dtype="float32")
  x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.hidden)).astype(args.dtype)
  valid = jnp.ones((1, args.tokens), bool)
  runs = {"dense": _step(transformer.Mlp(base), base, x, ())}
  for impl in args.impls.split(","):
    cfg = dataclasses.replace(base, moe=MoeConfig(
        num_experts=args.experts, top_k=args.top_k, ffn_hidden_size=args.ffn,
        grouped_impl=impl, tile=args.tile))
    runs[impl] = _step(moe_lib.Moe(cfg), cfg, x, (valid,))
  for run in runs.values():
    run()  # Compile.
  times = {k: [] for k in runs}
  for _ in range(args.repeats):
    for k, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[k].append(time.perf_counter() - t0)
  dense = statistics.median(times["dense"])
  print(f"{jax.default_backend()} {args.dtype}: {args.tokens} tokens, D {args.hidden}, "
        f"{args.experts} experts top-{args.top_k}, expert F {args.ffn} "
        f"(dense F {args.top_k * args.ffn}); forward+backward, median of {args.repeats}")
  print(f"  dense MLP: {dense * 1e3:.1f} ms")
  for k in runs:
    if k != "dense":
      t = statistics.median(times[k])
      print(f"  MoE ({k}): {t * 1e3:.1f} ms = {t / dense:.2f}x dense")


if __name__ == "__main__":
  main()
