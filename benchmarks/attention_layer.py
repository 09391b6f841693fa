"""One layer's causal attention, forward and forward+backward, in dpojax or in PyTorch.

  python benchmarks/attention_layer.py                        # dpojax: tiled (32) and dense
  /tmp/venvtrl/bin/python benchmarks/attention_layer.py --framework=torch   # PyTorch SDPA

The benchmark model's attention shape (16 rows x 256 tokens, 8 heads of 32 over 4 KV groups),
fp32, on the CPU: where dpojax and TRL differ on train_throughput's fixed pairs (BUILD.md,
"Against TRL on the same machine"). The torch side runs in the TRL venv of
benchmarks/trl_throughput.py (it does not import dpojax or jax). Median of --repeats calls.
"""

import argparse
import statistics
import time

B, T, N, G, K = 16, 256, 8, 4, 32


def timed(fn, repeats):
  fn()  # Compile / warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def run_jax(repeats):
  from dpojax import hostmem
  hostmem.retain_freed_memory()  # As train_throughput does (without it, +35% forward+backward).
  import jax
  import jax.numpy as jnp
  from dpojax import model as model_lib
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, N, K))
  k, v = (jax.random.normal(x, (B, T, G, K)) for x in keys[1:3])
  cot = jax.random.normal(keys[3], q.shape)
  mask = model_lib.attention_mask(jnp.ones((B, T), jnp.int32))
  for block in (32, 0):
    fwd = jax.jit(lambda q, k, v, block=block: model_lib.attend(q, k, v, mask, block))
    grad = jax.jit(jax.grad(lambda q, k, v, block=block: jnp.sum(
        model_lib.attend(q, k, v, mask, block) * cot), argnums=(0, 1, 2)))
    f = timed(lambda: jax.block_until_ready(fwd(q, k, v)), repeats)
    fb = timed(lambda: jax.block_until_ready(grad(q, k, v)), repeats)
    print(f"dpojax attention_block={block}: forward {f:.1f} ms, forward+backward {fb:.1f} ms")


def run_torch(repeats):
  import torch
  sdpa = torch.nn.functional.scaled_dot_product_attention
  q = torch.randn(B, N, T, K, requires_grad=True)
  k, v = (torch.randn(B, G, T, K, requires_grad=True) for _ in range(2))
  cot = torch.randn(B, N, T, K)

  def forward():
    with torch.no_grad():
      sdpa(q, k, v, is_causal=True, enable_gqa=True)

  def forward_backward():
    (sdpa(q, k, v, is_causal=True, enable_gqa=True) * cot).sum().backward()

  f, fb = timed(forward, repeats), timed(forward_backward, repeats)
  print(f"torch {torch.__version__} sdpa (threads={torch.get_num_threads()}): forward {f:.1f} "
        f"ms, forward+backward {fb:.1f} ms")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--framework", default="jax", choices=("jax", "torch"))
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  (run_jax if args.framework == "jax" else run_torch)(args.repeats)


if __name__ == "__main__":
  main()
