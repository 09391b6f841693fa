"""DPO training throughput against the matmul peak measured in the same process.

  python benchmarks/train_throughput.py                 # fixed-length pairs, live reference
  python benchmarks/train_throughput.py --devices=8     # the same on 8 emulated CPU devices
  python benchmarks/train_throughput.py --reference=precomputed   # 6N per token
  python benchmarks/train_throughput.py --data=hh       # HH-RLHF lengths: each layout
  python benchmarks/train_throughput.py --share_prompt  # + each pair's prompt computed once
  python benchmarks/train_throughput.py --model=135m --data=hh --hh_max_len=192 --pairs=4 \
      --micro_pairs=4 --hh_layouts=buckets        # issue 34: a real 135M model's shape
  python benchmarks/train_throughput.py --model=1b --data=packed --attention_impl=flash  # GPU

Model (issue 10): Llama-style, vocab 1000, hidden 256, FFN 688 (swiglu), 4 layers, 8 heads,
4 query groups, tied embeddings, rmsnorm, rope, fp32: N = 3,158,272 parameters. Work per
token is 8N FLOPs with a live reference (6N policy forward+backward, 2N reference forward),
6N with precomputed reference log-probs (the batch carries them; the precompute pass is not
timed). --data=hh tokenizes HH-RLHF harmless-base test pairs (any SentencePiece model; default
the google test model, vocab 1000 like the benchmark model), max length --hh_max_len, and times
--pairs pairs per step in each of --hh_layouts (benchmarks/common.HH_LAYOUTS): max (padded to
--hh_max_len, full-length log-probs: before issue 34), buckets (padded to the batch's length
bucket, log-probs at response tokens only: the default), rows (rows of 2 x --hh_max_len,
first_fit_decreasing, --pairs then counts ROWS), batch (each step's --pairs pairs packed into
bucketed rows of --hh_pack_size), batch_shared (the same with each prompt once): pairs/s
counts real pairs. Every distinct batch shape runs once before the clock (one compile each),
and the runs of a script alternate step by step (a busy machine slows them alike).
--model=135m: the shape of a real 135M chat model (common.MODEL_135M), random init. Without ../shared it falls
back to the 99-pair slice in tests/testdata and the toy tokenizer (too few pairs for figures).
--share_prompt adds data.share_prompt=True: fixed pairs go one per row (prompt once, both
responses branching off it; rows rounded up to a multiple of 8), HH pairs are packed so.
FLOP/s counts the tokens the step really runs (a shared prompt's tokens once).
--attention_impl=sparse: the block-sparse attention (only tiles that share a segment; for
packed rows on CPU). --hh_dump=PATH writes the HH pairs as ids for benchmarks/trl_throughput.py.
--model=1b (issue 10's GPU model, benchmarks/common.py: ~1.1B parameters, bf16 compute) with
--data=packed: synthetic pairs of random lengths packed first-fit-decreasing into --rows rows
of --pack_size tokens per step (--micro_rows per forward/backward); the peak is then an
8192^3 product in the model's compute dtype, and the H100 SXM datasheet's dense bf16
989.4 TFLOP/s is printed beside it.
"""

import argparse
import dataclasses
import functools
import resource
import json
import os
import statistics
import time



def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=1, help="emulated CPU devices (data parallel)")
  p.add_argument("--pairs", type=int, default=8, help="pairs per step")
  p.add_argument("--micro_pairs", type=int, default=8, help="pairs per micro-batch")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--remat", default="none")
  p.add_argument("--attention_block", type=int, default=32, help="0 = dense T x T attention")
  p.add_argument("--scan_unroll", type=int, default=0,
                 help="model.scan_unroll; 0 = every layer for the issue-10 model, 1 for 1b")
  p.add_argument("--logprob_impl", default="xla")
  p.add_argument("--dtype", default=None, help="compute dtype (default: the model's)")
  p.add_argument("--reference", default="copy", choices=("copy", "precomputed"))
  p.add_argument("--data", default="fixed", choices=("fixed", "hh", "packed"))
  p.add_argument("--hh_path", default=None,
                 help="default: ../shared's HH-RLHF harmless-base test split")
  p.add_argument("--hh_tokenizer", default=None,
                 help="default: ../shared's google SentencePiece test model (vocab 1000)")
  p.add_argument("--hh_max_len", type=int, default=512)
  p.add_argument("--share_prompt", action="store_true", help="also time data.share_prompt")
  p.add_argument("--hh_dump", default=None,
                 help="write the tokenized HH pairs (prompt / chosen / rejected ids, JSONL) "
                      "here and exit: benchmarks/trl_throughput.py --data=hh reads them")
  p.add_argument("--model", default="issue10", choices=("issue10", "1b", "135m", "tiny"))
  p.add_argument("--hh_layouts", default="max,buckets,rows",
                 help="--data=hh: comma list of benchmarks/common.HH_LAYOUTS")
  p.add_argument("--hh_pack_size", type=int, default=0,
                 help="row capacity of the batch layouts; 0 = 2 x --hh_max_len")
  p.add_argument("--length_buckets", type=int, default=4, help="data.length_buckets")
  p.add_argument("--response_only", default="on", choices=("on", "off"),
                 help="--data=fixed: log-probs at response tokens only (loss_positions)")
  p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "flash", "sparse"))
  p.add_argument("--flash_kernel", default="ours", choices=("ours", "jax"),
                 help="flash: our segment-skipping kernel or JAX's causal segment-masked one")
  p.add_argument("--pack_size", type=int, default=4096, help="--data=packed row length")
  p.add_argument("--rows", type=int, default=8, help="--data=packed rows per step")
  p.add_argument("--micro_rows", type=int, default=4, help="--data=packed rows per micro-batch")
  return p.parse_args()


ARGS = parse()
from dpojax import hostmem  # noqa: E402

hostmem.retain_freed_memory()  # As dpojax.main does: the numbers are what a run gets.
if ARGS.devices > 1:  # Must precede the jax import.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dpojax import model as model_lib  # noqa: E402
from dpojax.data import batching, buckets  # noqa: E402
from dpojax.ops import flash_attention  # noqa: E402
from dpojax.train import compiled, sharding  # noqa: E402
from dpojax.train import metrics as metrics_lib  # noqa: E402
from dpojax.train import precompute  # noqa: E402
from dpojax.train import step as step_lib  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)
from common import matmul_peak  # noqa: E402

H100_BF16_DENSE = 989.4e12  # H100 SXM datasheet, dense bf16 (no sparsity).


def synthetic_batch(rng, share_prompt=False):
  batch = common.synthetic_batch(rng, pairs=ARGS.pairs, seq=ARGS.seq, prompt=ARGS.prompt,
                                 micro_pairs=ARGS.micro_pairs, share_prompt=share_prompt)
  if ARGS.response_only == "off":
    return batch
  return buckets.add_loss_positions(batch, ARGS.seq - ARGS.prompt)


def hh_data(packing, share_prompt=False):
  return common.hh_data(packing, max_len=ARGS.hh_max_len, path=ARGS.hh_path,
                        tokenizer=ARGS.hh_tokenizer, share_prompt=share_prompt)


def hh_batches(layout):
  """Global batches of HH-RLHF pairs in one of common.HH_LAYOUTS."""
  opts = dict(common.HH_LAYOUTS[layout])
  opts.setdefault("length_buckets", ARGS.length_buckets)
  if ARGS.hh_pack_size:
    opts["pack_size"] = ARGS.hh_pack_size
  data = common.hh_data(opts.pop("packing"), max_len=ARGS.hh_max_len, path=ARGS.hh_path,
                        tokenizer=ARGS.hh_tokenizer, **opts)
  it = iter(batching.train_dataset(data, global_batch_size=ARGS.pairs,
                                   micro_batch_size=ARGS.micro_pairs, seed=0))
  return [next(it) for _ in range(ARGS.warmup + ARGS.steps)]


def dump_pairs(data, path):
  """Every pair the benchmark trains on, as ids, so that another trainer sees the same tokens."""
  with open(path, "w") as f:
    for i in range(len(data)):
      pair = data[i]
      p = int(pair["prompt_len"])
      f.write(json.dumps({"prompt": pair["chosen"][:p].tolist(),
                          "chosen": pair["chosen"][p:].tolist(),
                          "rejected": pair["rejected"][p:].tolist()}) + "\n")
  print(f"wrote {len(data)} pairs to {path}")


def prepare(step_cfg, batches, params, tx, schedule, mesh):
  """A function that runs step i on batches[i] and returns its wall time. Every distinct
  batch shape runs once first (its one compilation stays off the clock)."""
  if step_cfg.reference == "precomputed":  # The table a precompute pass would give.
    copy_cfg = dataclasses.replace(step_cfg, reference="copy")
    for b in batches:
      stats = np.asarray(precompute.reference_stats(params, b, cfg=copy_cfg))
      b["ref_logps_chosen"], b["ref_logps_rejected"] = stats[..., 0], stats[..., 1]
  ref_params = params if step_cfg.reference == "copy" else {}
  state = step_lib.init_state(params, tx)
  train_fn, _, state_sh, ref_sh = compiled.compile_steps(step_cfg, tx, schedule, state,
                                                     ref_params, mesh, batches[0])
  # Own buffers (no host round trip): the step donates the state, and params would alias it.
  ref, state = (jax.tree.map(jnp.copy, jax.device_put(x, sh))
                for x, sh in ((ref_params, ref_sh), (state, state_sh)))
  box = [state]

  def step(i):
    gbatch = sharding.global_batch(batches[i], mesh)
    t = time.perf_counter()
    box[0], metrics = train_fn(box[0], ref, gbatch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t

  seen = set()
  for i, batch in enumerate(batches):
    shape = tuple(sorted((k, v.shape) for k, v in batch.items()))
    if shape not in seen:
      seen.add(shape)
      step(i)
  return step


def summary(times, batches):
  """(median step time, mean real pairs per step, pairs/s over the timed span)."""
  pairs = [float(np.sum(b["pair_mask"])) for b in batches[ARGS.warmup:]]
  return statistics.median(times), statistics.mean(pairs), sum(pairs) / sum(times)


def main():
  if ARGS.hh_dump:
    dump_pairs(hh_data("none"), ARGS.hh_dump)
    return
  flash_attention.JAX_KERNEL = ARGS.flash_kernel == "jax"
  base = common.MODELS[ARGS.model]
  cfg = dataclasses.replace(base, remat=ARGS.remat, dtype=ARGS.dtype or base.dtype,
                            attention_block=ARGS.attention_block,
                            attention_impl=ARGS.attention_impl, scan_unroll=ARGS.scan_unroll or (
                                base.num_layers if ARGS.model == "issue10" else 1))
  if ARGS.data == "hh" and ARGS.share_prompt and "batch_shared" not in ARGS.hh_layouts:
    ARGS.hh_layouts += ",batch_shared"
  train_cfg = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=1, max_steps=1000, min_lr_ratio=0.1, weight_decay=0.0,
      adam_b1=0.9, adam_b2=0.98, adam_eps=1e-8, grad_clip=1.0))
  step_cfg = step_lib.StepConfig(model=cfg, beta=0.1, logprob_impl=ARGS.logprob_impl,
                                 reference=ARGS.reference)
  tx, schedule = step_lib.make_optimizer(train_cfg)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  n_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      functools.partial(model_lib.init_params, cfg), jax.random.key(0))))
  hostmem.fit_to_model(n_params)  # As dpojax.train.loop does.
  params = model_lib.init_params(cfg, jax.random.key(0))
  flops_per_token = metrics_lib.flops_per_token(n_params, reference=ARGS.reference)
  gpu = jax.default_backend() == "gpu"
  peak = matmul_peak(dtype=cfg.dtype)
  print(f"devices={jax.device_count()} ({jax.devices()[0].device_kind}) params={n_params:,} "
        f"dtype={cfg.dtype} "
        + (f"rows/step={ARGS.rows}x{ARGS.pack_size} " if ARGS.data == "packed"
           else f"pairs/step={ARGS.pairs} ") + f"remat={ARGS.remat} "
        f"logprob={ARGS.logprob_impl} reference={ARGS.reference} "
        f"attention={ARGS.attention_impl}"
        f"{'/' + ARGS.flash_kernel if ARGS.attention_impl != 'xla' else ''} "
        f"block={ARGS.attention_block} unroll={cfg.scan_unroll} "
        f"matmul_peak={peak / 1e9:.1f}G" + (
            f" (datasheet dense bf16 {H100_BF16_DENSE / 1e12:.1f}T)" if gpu else ""))
  if ARGS.data == "fixed":
    rng = np.random.default_rng(0)
    n = ARGS.warmup + ARGS.steps
    runs = {f"fixed {ARGS.seq}": [synthetic_batch(rng) for _ in range(n)]}
    if ARGS.share_prompt:
      runs["fixed shared prompt"] = [synthetic_batch(rng, True) for _ in range(n)]
  elif ARGS.data == "packed":
    runs = {f"packed {ARGS.pack_size}": common.packed_synthetic_batches(
        np.random.default_rng(0), steps=ARGS.warmup + ARGS.steps, rows=ARGS.rows,
        micro_rows=ARGS.micro_rows, pack_size=ARGS.pack_size, vocab=cfg.vocab_size)}
  else:
    runs = {f"hh {name}": hh_batches(name) for name in ARGS.hh_layouts.split(",")}
  # Layouts alternate step by step (A, B, A, B...), so a busy machine slows them alike.
  steppers = {name: prepare(step_cfg, batches, params, tx, schedule, mesh)
              for name, batches in runs.items()}
  times = {name: [] for name in runs}
  for i in range(ARGS.warmup + ARGS.steps):
    for name, step in steppers.items():
      elapsed = step(i)
      if i >= ARGS.warmup:
        times[name].append(elapsed)
  results = {}
  for name, batches in runs.items():
    step, pairs, pairs_per_s = summary(times[name], batches)
    tokens = np.mean([np.sum(b["segment_ids"] > 0) for b in batches[ARGS.warmup:]])
    flops = flops_per_token * tokens / step
    results[name] = pairs_per_s
    # pairs/s: all pairs over all timed time; median_pairs/s: pairs/step over the median
    # step, steadier when one step grows the heap (HH batches vary).
    print(f"{name}: step_time_s={step:.4f} pairs/step={pairs:.1f} pairs/s={pairs_per_s:.2f} "
          f"median_pairs/s={pairs / step:.2f} "
          f"tokens/s={tokens / step:.0f} model_flops/s({flops_per_token / n_params:.0f}N)="
          f"{flops / 1e9:.1f}G ratio={flops / peak:.1%}" + (
              f" mfu_datasheet={flops / H100_BF16_DENSE:.1%}" if gpu else ""), flush=True)
  if len(results) > 1:
    first = next(iter(results))
    print(", ".join(f"{name}/{first} pairs/s: {r / results[first]:.2f}x"
                    for name, r in results.items()))
  print(f"peak_rss_gib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")


if __name__ == "__main__":
  main()
