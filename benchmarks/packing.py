"""Packing speed and efficiency, and padded vs packed training throughput.

  python benchmarks/packing.py                 # pack 1,000,000 synthetic pair lengths
  python benchmarks/packing.py --hh=HH.jsonl.gz --tokenizer=SP.model   # + HH-RLHF efficiency
  python benchmarks/packing.py --hh=... --tokenizer=... --train_steps=20  # + pairs/s

Synthetic lengths: lognormal around 2 x 180 tokens (HH-RLHF-like), clipped to [16, pack_size];
the time is pack() alone (the rows of the whole epoch), best of --repeats.
HH-RLHF: tokenized with the given SentencePiece model, pairs longer than --max_seq_length
dropped (on_error=skip for the file's nine bad lines); token efficiency = real tokens / row
slots, padded efficiency = real tokens / (2 x pairs x max_seq_length).
Training: the same pairs, padded (micro-batch = M pairs, 2M rows of max_seq_length) vs packed
(micro-batch = M rows of pack_size: the same token slots per micro-batch), the default
config's model (vocabulary widened to the tokenizer's), one micro-batch per step; pairs/s
after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from dpojax.data import batching, packed_dir, packing, pipeline
from dpojax.data.tokenize import Tokenizer


def synthetic(n: int, pack_size: int, repeats: int, strategies):
  rng = np.random.default_rng(0)
  lengths = np.clip(rng.lognormal(np.log(360), 0.6, n), 16, pack_size).astype(np.int64)
  out = {}
  for strategy in strategies:
    times, result = [], None
    for r in range(repeats):
      start = time.perf_counter()
      result = packing.pack(lengths, pack_size, strategy, seed=r)
      times.append(time.perf_counter() - start)
    stats = packing.stats(lengths, result[0], pack_size)
    out[strategy] = {"seconds": round(min(times), 3), "first_call_seconds": round(times[0], 3),
                     **stats}
    print(f"{strategy}: {n:,} pairs (mean {lengths.mean():.0f} tokens) -> {stats['rows']:,} "
          f"rows of {pack_size} in {min(times):.3f} s (first call {times[0]:.3f} s), token "
          f"efficiency {100 * stats['token_efficiency']:.2f}%", flush=True)
  return out


def hh_data(path, tokenizer, max_seq_length, pack_size, packing_opt="none"):
  # length_buckets=1: padded rows keep max_seq_length, the layout this script compares.
  opts = pipeline.DataOptions(max_seq_length=max_seq_length, on_error="skip",
                              packing=packing_opt, pack_size=pack_size, length_buckets=1)
  return pipeline.PreferenceData(path, Tokenizer(tokenizer), opts)


def hh_efficiency(data, pack_size):
  out = {}
  for strategy in packing.STRATEGIES:
    row_starts, items = packing.pack(data.pair_lengths, pack_size, strategy, seed=0)
    opts = data.opts
    stats = packed_dir.packing_stats(data, row_starts, items)
    out[strategy] = stats
    print(f"HH-RLHF {strategy}: {stats['pairs']} pairs ({data.stats['dropped']} dropped > "
          f"{opts.max_seq_length}, {data.stats['skipped']} skipped) -> {stats['rows']} rows of "
          f"{pack_size}: token efficiency {100 * stats['token_efficiency']:.2f}%, padded "
          f"{100 * stats['padded_efficiency']:.2f}%, pairs/row {stats['pairs_per_row_mean']:.2f}"
          f" (max {stats['pairs_per_row_max']})", flush=True)
  return out


def train_throughput(args):
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  from conftest import load_default_config  # The default config, as the CLI reads it.

  from dpojax import model as model_lib
  from dpojax.train import step as step_lib

  config = load_default_config()
  tok = Tokenizer(args.tokenizer)
  config.model.vocab_size = -(-tok.vocab_size // 128) * 128
  for key in ("hidden_size", "num_layers", "ffn_hidden_size"):
    if getattr(args, key):
      config.model[key] = getattr(args, key)
  config.model.max_position_embeddings = args.pack_size
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  step_cfg = step_lib.StepConfig(model=model_cfg, beta=0.1)
  config.train.max_steps = args.train_steps + 2
  tx, schedule = step_lib.make_optimizer(config.train)
  train_fn, _ = step_lib.jit_steps(step_cfg, tx, schedule)
  params = model_lib.init_params(model_cfg, jax.random.key(0))
  out = {"device": str(jax.devices()[0]), "model_parameters": int(sum(
      x.size for x in jax.tree.leaves(params)))}
  m = args.micro_batch_size
  for name, packing_opt in (("padded", "none"), ("packed", "first_fit_decreasing")):
    data = hh_data(args.hh, args.tokenizer, args.max_seq_length, args.pack_size, packing_opt)
    it = iter(batching.train_dataset(data, global_batch_size=m, micro_batch_size=m, seed=0,
                                     process_index=0, process_count=1))
    state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)  # Donated; params stay.
    batches = [next(it) for _ in range(args.train_steps + 2)]
    for batch in batches[:2]:  # Compile and warm up.
      state, metrics = train_fn(state, params, batch)
    jax.block_until_ready(metrics)
    pairs = tokens = 0
    start = time.perf_counter()
    for batch in batches[2:]:
      state, metrics = train_fn(state, params, batch)
      pairs += float(batch["pair_mask"].sum())
      tokens += int((batch["segment_ids"] > 0).sum())
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    out[name] = {"pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
                 "pairs_per_step": pairs / args.train_steps,
                 "batch_shape": list(batches[0]["tokens"].shape)}
    print(f"train {name}: {pairs / seconds:.1f} pairs/s, {tokens / seconds:,.0f} real tokens/s "
          f"({pairs / args.train_steps:.1f} pairs/step, batch {batches[0]['tokens'].shape})",
          flush=True)
  out["speedup"] = out["packed"]["pairs_per_s"] / out["padded"]["pairs_per_s"]
  print(f"packed/padded pairs/s: {out['speedup']:.2f}x on {out['device']}")
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", type=int, default=1_000_000)
  p.add_argument("--pack_size", type=int, default=1024)
  p.add_argument("--max_seq_length", type=int, default=512)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--strategies", default=",".join(packing.STRATEGIES))
  p.add_argument("--hh", default="", help="HH-RLHF JSONL(.gz)")
  p.add_argument("--tokenizer", default="", help="SentencePiece model for --hh")
  p.add_argument("--train_steps", type=int, default=0, help="time this many train steps")
  p.add_argument("--micro_batch_size", type=int, default=8, help="pairs (padded) / rows")
  p.add_argument("--hidden_size", type=int, default=0)
  p.add_argument("--num_layers", type=int, default=0)
  p.add_argument("--ffn_hidden_size", type=int, default=0)
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  results = {}
  if args.pairs:
    results["synthetic"] = synthetic(args.pairs, args.pack_size, args.repeats,
                                     args.strategies.split(","))
  if args.hh:
    data = hh_data(args.hh, args.tokenizer, args.max_seq_length, args.pack_size)
    results["hh"] = hh_efficiency(data, args.pack_size)
    if args.train_steps:
      results["train"] = train_throughput(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
