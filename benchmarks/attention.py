"""Policy forward+backward time of the benchmark model per `model.attention_block`.

  python benchmarks/attention.py                         # 4 rows x 1024 tokens; dense vs the default 32
  python benchmarks/attention.py --rows=16 --seq=256 --blocks=0,32

Model: the one in benchmarks/train_throughput.py. Every row is one causal sequence (the mask
of a packed row only removes more). Runs of the variants are interleaved, so a busy machine
slows them alike; the median of --repeats is printed. A block below seq/8 is raised to seq/8
(at most 8 tiles), as the model does.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from dpojax import model as model_lib
from dpojax.ops import logprob as lp

from common import MODEL  # benchmarks/common.py



def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--blocks", default="0,32", help="attention_block values (0 = dense)")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  b, t = args.rows, args.seq
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, MODEL.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.ones((b, t), jnp.int32)
  params = model_lib.init_params(MODEL, jax.random.key(0))
  grads = {}
  for block in (int(x) for x in args.blocks.split(",")):
    cfg = dataclasses.replace(MODEL, attention_block=block)

    def loss(p, cfg=cfg):
      h = model_lib.apply(p, cfg, tokens, positions, segments).reshape(b * t, -1)
      return jnp.sum(lp.logprob(h, model_lib.output_weight(p, cfg), tokens.reshape(-1),
                                jnp.ones(b * t, bool), impl="xla"))
    grads[block] = jax.jit(jax.grad(loss))
    jax.block_until_ready(grads[block](params))  # Compile outside the timing.
  times = {k: [] for k in grads}
  for _ in range(args.repeats):
    for k, fn in grads.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params))
      times[k].append(time.perf_counter() - start)
  base = statistics.median(times[next(iter(times))])
  for k, ts in times.items():
    m = statistics.median(ts)
    print(f"attention_block={k:4d}  {b} x {t} tokens  fwd+bwd {m:.3f} s  ({base / m:.2f}x the first)")


if __name__ == "__main__":
  main()
