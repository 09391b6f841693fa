"""Per-device memory of the compiled DPO train step as the context axis splits each row.

  python benchmarks/context_memory.py                       # T = 4k..32k, C = 1, 2, 4, 8
  python benchmarks/context_memory.py --tiny --lengths=64 --contexts=1,2 --budget_gib=0.01 \
      --max_length=128                                      # the test's smoke size

Compile only (no step runs): XLA's memory analysis of the jitted, state-donating train step
on C emulated CPU devices (mesh data 1 x context C), one pair (two rows of T tokens) per
step. `temp` is the step's temporaries (activations, attention scores, gradients in flight),
`args` its inputs (state, reference, batch), both per device. C = 1 is the one-device path
(dense masked attention); C > 1 the context path (ops/context_attention.py). Then, for each
C, the longest row (T doubling from the first length, up to --max_length) whose temporaries
fit --budget_gib per device. Last, the load balance: per-device attention work of rows of
the first length (`context_attention.block_work`: the blocks the kernel computes and the
query-key products that count), for one causal sequence per row and for packed rows.
Model: benchmarks/common.py's (Llama-style, 4 layers, hidden 256, 8 heads, 4 KV groups,
vocab 1000, fp32), with the default attention tiles.
"""

import argparse
import dataclasses
import functools
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dpojax import workdir  # noqa: E402
from dpojax.model import transformer  # noqa: E402
from dpojax.ops import context_attention  # noqa: E402
from dpojax.train import compiled, reference, sharding  # noqa: E402
from dpojax.train import step as step_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

GIB = 2 ** 30
DEFAULT_CONFIG = os.path.join(common.ROOT, "configs", "dpo_gpt.py")


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="4096,8192,16384,32768")
  p.add_argument("--contexts", default="1,2,4,8")
  p.add_argument("--budget_gib", type=float, default=4.0, help="per-device temporaries")
  p.add_argument("--max_length", type=int, default=262144, help="the budget search's cap")
  p.add_argument("--remat", default="none", help="model.remat: none | full | dots")
  p.add_argument("--tiny", action="store_true", help="a 1-layer, hidden-32 model (smoke test)")
  return p.parse_args()


@functools.cache
def step_memory(model, t: int, c: int) -> tuple[int, int]:
  """(temp bytes, argument bytes) per device of the train step for one pair of T tokens."""
  cfg = step_lib.StepConfig(model=model)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, context=c)),
                            jax.devices()[:c])
  cfg = dataclasses.replace(cfg, mesh=mesh)
  tx, schedule = step_lib.make_optimizer(workdir.load_config_file(DEFAULT_CONFIG).train)
  params = jax.eval_shape(lambda k: transformer.init_params(model, k), jax.random.key(0))
  parts = reference.abstract_split(cfg, params, sync=False)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), parts.trainable)
  batch = common.synthetic_batch(np.random.default_rng(0), pairs=1, seq=t, prompt=t // 8,
                                 micro_pairs=1)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)
  train, _, _, _ = compiled.compile_steps(cfg, tx, schedule, state, parts.frozen, mesh, batch)
  m = train.lower(state, parts.frozen, batch).compile().memory_analysis()
  return m.temp_size_in_bytes, m.argument_size_in_bytes


def main():
  args = parse()
  model = dataclasses.replace(common.MODEL, attention_block=transformer.ModelConfig.attention_block,
                              remat=args.remat, max_position_embeddings=args.max_length)
  if args.tiny:
    model = dataclasses.replace(model, num_layers=1, hidden_size=32, ffn_hidden_size=64,
                                num_attention_heads=4, num_query_groups=2, vocab_size=128)
  lengths = [int(x) for x in args.lengths.split(",")]
  contexts = [int(x) for x in args.contexts.split(",")]
  print(f"per-device temporaries of the train step, MiB (one pair, remat={args.remat}; "
        f"in brackets: C=1's figure / this one)")
  print("| T | " + " | ".join(f"C = {c}" for c in contexts) + " |")
  print("|---" * (len(contexts) + 1) + "|")
  for t in lengths:
    temps = [step_memory(model, t, c)[0] for c in contexts]
    cells = [f"{x / 2**20:,.0f}" + ("" if c == contexts[0] else f" ({temps[0] / x:.1f}x)")
             for x, c in zip(temps, contexts)]
    print(f"| {t} | " + " | ".join(cells) + " |", flush=True)
  print(f"\nlongest row whose temporaries fit {args.budget_gib:g} GiB per device "
        f"(T doubling from {lengths[0]}, at most {args.max_length})")
  for c in contexts:
    t, best = lengths[0], None
    while t <= args.max_length:
      temp = step_memory(model, t, c)[0]
      if temp > args.budget_gib * GIB:
        break
      best, t = (t, temp), t * 2
    fits = "none" if best is None else f"T = {best[0]} ({best[1] / 2**20:,.0f} MiB)"
    print(f"C = {c}: {fits}", flush=True)
  print(f"\nper-device attention work, T = {lengths[0]}: blocks computed; products (max/min)")
  for name, (ids, pos) in rows(lengths[0]).items():
    for c in contexts:
      if c == 1:
        continue
      order = context_attention.mirrored_order(ids.shape[1], c)
      blocks, work = context_attention.block_work(ids[:, order], pos[:, order], c)
      print(f"{name}, C = {c}: blocks {blocks.tolist()}; products {work.tolist()} "
            f"({work.max() / work.min():.3f})")


def rows(t: int) -> dict:
  """[1, T] segment ids and positions: one causal sequence, and packed sequences of uniform
  random lengths between T / 16 and T / 4 (a fixed seed) filling the row."""
  one = (np.ones((1, t), np.int32), np.arange(t, dtype=np.int32)[None])
  rng, ids, pos, start, seg = np.random.default_rng(0), np.zeros((1, t), np.int32), \
      np.zeros((1, t), np.int32), 0, 1
  while start < t:
    n = min(int(rng.integers(t // 16, t // 4)), t - start)
    ids[0, start:start + n], pos[0, start:start + n] = seg, np.arange(n)
    start, seg = start + n, seg + 1
  return {"one sequence": one, "packed": (ids, pos)}


if __name__ == "__main__":
  main()
