"""What the benchmark scripts share: issue 10's benchmark model, its synthetic pairs, the
HH-RLHF pairs and the in-process matmul peak. Import after any XLA_FLAGS are set (this imports
jax)."""

import os

import numpy as np

from dpojax.data import batching, packing, pipeline
from dpojax.model import transformer
from dpojax.train import compiled

# Llama-style, vocab 1000, hidden 256, FFN 688 (swiglu), 4 layers, 8 heads, 4 query groups,
# tied embeddings, rmsnorm, rope, fp32: N = 3,158,272 parameters.
MODEL = transformer.ModelConfig(
    vocab_size=1000, hidden_size=256, ffn_hidden_size=688, num_layers=4,
    num_attention_heads=8, num_query_groups=4, activation="swiglu", normalization="rmsnorm",
    position_embedding_type="rope", share_embeddings_and_output_weights=True,
    max_position_embeddings=8192, attention_block=0, scan_unroll=1)


# ~1B Llama (TinyLlama-1.1B's shape: vocab 32000, hidden 2048, FFN 5632, 22 layers, 32 heads,
# 4 query groups, untied output), bf16 compute over fp32 master weights: issue 10's GPU model.
MODEL_1B = transformer.ModelConfig(
    vocab_size=32000, hidden_size=2048, ffn_hidden_size=5632, num_layers=22,
    num_attention_heads=32, num_query_groups=4, activation="swiglu", normalization="rmsnorm",
    position_embedding_type="rope", share_embeddings_and_output_weights=False,
    max_position_embeddings=4096, dtype="bfloat16", attention_block=0, scan_unroll=1)


# The shape of a real 135M chat model (SmolLM2-135M's: vocab 49152, hidden 576, FFN 1536, 30
# layers, 9 heads, 3 KV heads, tied), random init, fp32: issue 34's --model=135m.
MODEL_135M = transformer.ModelConfig(
    vocab_size=49152, hidden_size=576, ffn_hidden_size=1536, num_layers=30,
    num_attention_heads=9, num_query_groups=3, activation="swiglu", normalization="rmsnorm",
    position_embedding_type="rope", share_embeddings_and_output_weights=True,
    max_position_embeddings=8192, attention_block=0, scan_unroll=1)

# One small layer: the tests' smoke runs of the scripts (compiles in seconds).
MODEL_TINY = transformer.ModelConfig(
    vocab_size=1000, hidden_size=32, ffn_hidden_size=64, num_layers=1, num_attention_heads=2,
    num_query_groups=1, activation="swiglu", normalization="rmsnorm",
    position_embedding_type="rope", share_embeddings_and_output_weights=True,
    max_position_embeddings=8192, attention_block=0, scan_unroll=1)

MODELS = {"issue10": MODEL, "1b": MODEL_1B, "135m": MODEL_135M, "tiny": MODEL_TINY}

# HH layouts (train_throughput.py --data=hh): data options over hh_data's.
HH_LAYOUTS = {
    "max": dict(packing="none", length_buckets=1, response_only=False),  # Before issue 34.
    "buckets": dict(packing="none"),  # Length buckets + response-only log-probs.
    "rows": dict(packing="first_fit_decreasing"),  # Rows of 2 x max_len; batches count rows.
    "batch": dict(packing="batch"),  # Each step's pairs packed; batches count pairs.
    "batch_shared": dict(packing="batch", share_prompt=True),
}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_PATH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base", "test.jsonl.gz")
HH_TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "sentencepiece-test",
                            "test_model.model")


def hh_data(packing_name, *, max_len, path=None, tokenizer=None, share_prompt=False, **opts):
  """The HH-RLHF pairs (tokenized, over-long ones dropped), padded (`packing_name` "none") or
  packed into rows of 2 * max_len (`opts`: other data options). Defaults: ../shared's harmless-base test split and the
  google test tokenizer (vocab 1000, like the benchmark model); a clone without ../shared
  falls back to the test slice and the toy tokenizer."""
  from dpojax.data.tokenize import Tokenizer
  path, tokenizer = path or HH_PATH, tokenizer or HH_TOKENIZER
  if not (os.path.exists(path) and os.path.exists(tokenizer)):
    path = os.path.join(ROOT, "tests", "testdata", "hh-rlhf", "harmless-base-test-slice.jsonl.gz")
    tokenizer = os.path.join(ROOT, "dpojax", "assets", "tokenizer.model")
    print(f"(HH-RLHF data or tokenizer missing: using {path} and {tokenizer})")
  opts = pipeline.DataOptions(**dict(dict(
      max_seq_length=max_len, template="plain", truncation="drop", on_error="skip",
      packing=packing_name, pack_size=2 * max_len, share_prompt=share_prompt), **opts))
  return pipeline.PreferenceData(path, Tokenizer(tokenizer), opts)


def synthetic_batch(rng, *, pairs, seq, prompt, micro_pairs, share_prompt=False):
  """`pairs` fixed-length pairs (a shared prompt, random responses) as one padded batch, or
  with `share_prompt` one pair per packed row (data.share_prompt's layout)."""
  def sequence(prompt_ids):
    return np.concatenate([prompt_ids, rng.integers(3, MODEL.vocab_size, seq - prompt)])

  items = []
  for _ in range(pairs):
    prompt_ids = rng.integers(3, MODEL.vocab_size, prompt)
    items.append({"chosen": sequence(prompt_ids), "rejected": sequence(prompt_ids),
                  "prompt_len": prompt, "chosen_reward": None, "rejected_reward": None})
  if not share_prompt:
    return batching.collate(items, micro_batch_size=micro_pairs, seq_len=seq,
                            opts=pipeline.DataOptions(max_seq_length=seq))
  row = -(-int(packing.item_lengths(prompt, seq, seq, True)) // 8) * 8
  return packing.collate_rows([[i] for i in range(pairs)], items.__getitem__,
                              micro_rows=micro_pairs, pack_size=row, pairs_per_row=1,
                              default_rewards=(1.0, 0.0), share_prompt=True)


def packed_synthetic_batches(rng, *, steps, rows, micro_rows, pack_size, vocab):
  """`steps` global batches of `rows` packed rows: pairs of random token ids with uniform
  random prompt (up to pack_size / 8) and response (up to pack_size / 4, each side its own)
  lengths, packed first-fit-decreasing into rows of `pack_size` as the data pipeline does."""
  pairs, lengths = [], []
  response = lambda: rng.integers(3, vocab, int(rng.integers(8, pack_size // 4)))
  while True:
    p = int(rng.integers(8, pack_size // 8))
    ids = rng.integers(3, vocab, p)
    pairs.append({"chosen": np.concatenate([ids, response()]),
                  "rejected": np.concatenate([ids, response()]), "prompt_len": p,
                  "chosen_reward": None, "rejected_reward": None})
    lengths.append(len(pairs[-1]["chosen"]) + len(pairs[-1]["rejected"]))
    if sum(lengths) > 1.05 * steps * rows * pack_size:  # Enough to fill steps * rows rows?
      starts, items = packing.pack(lengths, pack_size, "first_fit_decreasing", seed=0)
      if len(starts) - 1 >= steps * rows:
        break
  row_items = [items[starts[r]:starts[r + 1]] for r in range(steps * rows)]
  per_row = max(len(r) for r in row_items)
  return [packing.collate_rows(row_items[i * rows:(i + 1) * rows], pairs.__getitem__,
                               micro_rows=micro_rows, pack_size=pack_size, pairs_per_row=per_row,
                               default_rewards=(1.0, 0.0)) for i in range(steps)]


def matmul_peak(n=None, repeats=5, dtype="float32"):
  """Best FLOP/s of an n x n x n product, as the training loop measures it for MFU."""
  return compiled.matmul_peak_flops(n, repeats, dtype)
