"""One layer's causal attention, forward and forward+backward, in dpojax or in PyTorch.

  python benchmarks/attention_layer.py                        # dpojax: tiled (32) and dense
  /tmp/venvtrl/bin/python benchmarks/attention_layer.py --framework=torch   # PyTorch SDPA
  python benchmarks/attention_layer.py --data=hh              # HH-RLHF rows: tiles vs sparse

The benchmark model's attention shape (16 rows x 256 tokens, 8 heads of 32 over 4 KV groups),
fp32, on the CPU: where dpojax and TRL differ on train_throughput's fixed pairs (BUILD.md,
"Against TRL on the same machine"). The torch side runs in the TRL venv of
benchmarks/trl_throughput.py (it does not import dpojax or jax). Median of --repeats calls.
--data=hh: the same layer on the segment ids of the first padded (16 x 512) and packed
(8 x 1024) micro-batches of `train_throughput.py --data=hh` (same files and options), with the
tiles (`xla`) and the block-sparse path at 32 and 64 tokens. --trace=DIR writes a
jax.profiler trace of the timed calls (per-op times; pin to one core with `taskset -c 0` so
that they add up).
"""

import argparse
import dataclasses
import statistics
import time

import numpy as np

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


def hh_segments():
  """Segment ids [rows, T] of the first padded and packed micro-batches that
  `train_throughput.py --data=hh` trains on (its default files, max length 512, 8 pairs)."""
  import common  # benchmarks/common.py (imports jax)
  from dpojax.data import batching
  out = {}
  for name, packing in (("padded", "none"), ("packed", "first_fit_decreasing")):
    data = common.hh_data(packing, max_len=512, length_buckets=1)  # Padded: 512 wide.
    batch = next(iter(batching.train_dataset(data, global_batch_size=8, micro_batch_size=8,
                                             seed=0)))
    seg = np.asarray(batch["segment_ids"])
    out[name] = seg.reshape(-1, seg.shape[-1])
  return out


def run_jax_hh(repeats):
  from dpojax import hostmem
  hostmem.retain_freed_memory()
  import jax
  import jax.numpy as jnp
  from dpojax import model as model_lib
  from common import MODEL  # benchmarks/common.py
  for name, seg in hh_segments().items():
    rows, t = seg.shape
    scores = sum(int(np.sum(r == i)) * (int(np.sum(r == i)) + 1) // 2
                 for r in seg for i in np.unique(r[r > 0]))
    print(f"hh {name}: {rows} x {t} tokens, {np.sum(seg > 0)} real in "
          f"{sum(len(np.unique(r[r > 0])) for r in seg)} sequences, {scores:,} causal scores a head")
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (rows, t, N, K))
    k, v = (jax.random.normal(x, (rows, t, G, K)) for x in keys[1:3])
    cot = jax.random.normal(keys[3], q.shape)
    for impl, block in (("xla", 32), ("sparse", 32), ("sparse", 64)):
      cfg = dataclasses.replace(MODEL, attention_impl=impl, attention_block=block)
      mask = jax.jit(lambda s, cfg=cfg: model_lib.layer_mask(cfg, s))(jnp.asarray(seg))
      layer = lambda q, k, v, mask=mask, block=block: model_lib.attend(q, k, v, mask, block)
      fwd = jax.jit(layer)
      grad = jax.jit(jax.grad(lambda q, k, v, layer=layer: jnp.sum(layer(q, k, v) * cot),
                              argnums=(0, 1, 2)))
      f = timed(lambda: jax.block_until_ready(fwd(q, k, v)), repeats)
      fb = timed(lambda: jax.block_until_ready(grad(q, k, v)), repeats)
      print(f"  {impl} attention_block={block}: forward {f:.1f} ms, forward+backward {fb:.1f} ms")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--framework", default="jax", choices=("jax", "torch"))
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--data", default="fixed", choices=("fixed", "hh"),
                 help="hh: HH-RLHF rows, dpojax only")
  p.add_argument("--trace", default=None, help="jax.profiler trace folder (dpojax only)")
  args = p.parse_args()
  if args.trace and args.framework == "torch":
    p.error("--trace profiles the dpojax side only")
  run = run_jax_hh if args.data == "hh" else run_jax if args.framework == "jax" else run_torch
  if args.trace:
    import jax
    with jax.profiler.trace(args.trace):
      run(args.repeats)
  else:
    run(args.repeats)


if __name__ == "__main__":
  main()
