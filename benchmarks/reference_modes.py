"""Train-step time and compiled peak memory per reference mode, full fine-tuning and LoRA.

  python benchmarks/reference_modes.py                  # benchmark model, 8 pairs x 256 tokens
  python benchmarks/reference_modes.py --steps=20 --lora_targets=attention_qkv --lora_rank=32

Model: the one in benchmarks/train_throughput.py (Llama-style, 3,158,272 parameters, fp32).
Modes: full fine-tuning with reference copy | precomputed | none, and LoRA with lora_base |
copy (a separate reference tree) | precomputed. Steps of all modes are interleaved, one at a
time, so a busy machine slows them alike; the median is reported. Memory is XLA's compiled
memory analysis of the jitted, state-donating train step: arguments + temporaries + outputs -
aliased (donated) outputs. Precomputed batches carry `ref_logps_chosen`/`_rejected` from
the forward the precompute pass runs (`dpojax.train.precompute`); their loss is checked against
copy's.
"""

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpojax.model import lora
from dpojax.model import transformer
from dpojax.train import precompute
from dpojax.train import reference
from dpojax.train import step as step_lib

import common  # benchmarks/common.py
from common import MODEL


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", type=int, default=8, help="pairs per step")
  p.add_argument("--micro_pairs", type=int, default=8, help="pairs per micro-batch")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps per mode (median)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--logprob_impl", default="xla")
  p.add_argument("--lora_targets", default="all")
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--modes", default="copy,precomputed,none,lora:lora_base,lora:copy,"
                 "lora:precomputed")
  return p.parse_args()


def synthetic_batch(args, rng):
  return common.synthetic_batch(rng, pairs=args.pairs, seq=args.seq, prompt=args.prompt,
                                micro_pairs=args.micro_pairs)


def mb(n):
  return f"{n / 2**20:8.2f}"


def main():
  args = parse()
  train_cfg = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=1, max_steps=1000, min_lr_ratio=0.1, weight_decay=0.0,
      adam_b1=0.9, adam_b2=0.98, adam_eps=1e-8, grad_clip=1.0))
  tx, schedule = step_lib.make_optimizer(train_cfg)
  base_cfg = step_lib.StepConfig(model=MODEL, beta=0.1, logprob_impl=args.logprob_impl)
  lcfg = lora.LoraConfig(targets=tuple(args.lora_targets.split(",")), rank=args.lora_rank)
  params = transformer.init_params(MODEL, jax.random.key(0))
  param_bytes = lora.nbytes(params)
  batch = synthetic_batch(args, np.random.default_rng(0))
  # What the precompute pass stores for these pairs: the reference = the initial policy.
  ref_fn = functools.partial(precompute.reference_stats, cfg=base_cfg)
  ref_logps = np.asarray(ref_fn(params, batch))
  ref_times = []
  batch_pre = dict(batch, ref_logps_chosen=ref_logps[..., 0],
                   ref_logps_rejected=ref_logps[..., 1])

  runs = {}
  for name in args.modes.split(","):
    use_lora, mode = name.startswith("lora:"), name.split(":")[-1]
    cfg = dataclasses.replace(base_cfg, lora=lcfg if use_lora else None, reference=mode)
    parts = reference.split(cfg, params)
    b = batch_pre if mode == "precomputed" else batch
    state = step_lib.init_state(jax.tree.map(jnp.copy, parts.trainable), tx)
    fn = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, tx=tx, schedule=schedule),
                 donate_argnums=0)
    compiled = fn.lower(state, parts.frozen, b).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)
    runs[name] = dict(fn=compiled, state=state, frozen=parts.frozen, batch=b, times=[],
                      args=m.argument_size_in_bytes, temp=m.temp_size_in_bytes, peak=peak,
                      trained=lora.nbytes(parts.trainable))
  first = {}
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    jax.block_until_ready(ref_fn(params, batch))  # The precompute pass's forward, per batch.
    if i >= args.warmup:
      ref_times.append(time.perf_counter() - t)
    for name, r in runs.items():
      t = time.perf_counter()
      r["state"], metrics = r["fn"](r["state"], r["frozen"], r["batch"])
      jax.block_until_ready(metrics)
      if i == 0:
        first[name] = jax.device_get(metrics)
      if i >= args.warmup:
        r["times"].append(time.perf_counter() - t)

  for a, b in (("precomputed", "copy"), ("lora:precomputed", "lora:copy")):
    if a in first and b in first:
      diff = max(abs(float(first[a][k]) - float(first[b][k])) for k in first[b])
      print(f"first-step metrics {a} vs {b}: max |difference| = {diff:.2e}")
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"\nmodel {n_params:,} parameters ({mb(param_bytes)} MiB fp32), {args.pairs} pairs x "
        f"{args.seq} tokens, micro {args.micro_pairs}, logprob={args.logprob_impl}, "
        f"LoRA targets={','.join(lcfg.targets)} rank={lcfg.rank}, device {jax.devices()[0]}")
  print(f"{'mode':18s} {'step s':>8s} {'vs copy':>8s} {'trained MiB':>12s} {'args MiB':>9s} "
        f"{'temp MiB':>9s} {'peak MiB':>9s}")
  ref_time = statistics.median(runs["copy"]["times"]) if "copy" in runs else None
  for name, r in runs.items():
    step = statistics.median(r["times"])
    ratio = f"{step / ref_time:8.3f}" if ref_time else "       -"
    print(f"{name:18s} {step:8.4f} {ratio} {mb(r['trained']):>12s} {mb(r['args']):>9s} "
          f"{mb(r['temp']):>9s} {mb(r['peak']):>9s}")
  print(f"{'reference forward':18s} {statistics.median(ref_times):8.4f}   (the precompute pass, "
        "once per batch of pairs)")
  if "lora:copy" in runs and "lora:lora_base" in runs:
    saved = runs["lora:copy"]["peak"] - runs["lora:lora_base"]["peak"]
    print(f"\nlora_base saves {mb(saved).strip()} MiB of peak vs LoRA with a reference copy "
          f"(one parameter copy = {mb(param_bytes).strip()} MiB)")
  if "lora:precomputed" in runs and "lora:lora_base" in runs:
    ratio = (statistics.median(runs["lora:precomputed"]["times"])
             / statistics.median(runs["lora:lora_base"]["times"]))
    print(f"LoRA precomputed / lora_base step time: {ratio:.3f}")


if __name__ == "__main__":
  main()
