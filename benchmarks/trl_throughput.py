"""Hugging Face TRL's DPOTrainer throughput on train_throughput.py's fixed-length or HH benchmark.

Same model (issue 10: Llama-style, vocab 1000, hidden 256, FFN 688, 4 layers, 8 heads, 4 kv
heads, tied embeddings, fp32, N = 3,158,272), same data (8 pairs per step, 64-token prompt,
192-token responses, every sequence 256 tokens), beta 0.1 sigmoid loss, AdamW at 1e-4, on
the CPU. Reports the median step time (one optimizer step, timed by a callback; the
collator runs before it, as our batches are built before the clock) against the fp32
matmul peak measured in the same process, so the two frameworks compare on one machine.
Work per token is 8N FLOPs with a live reference, 6N with --reference=precomputed (TRL's
precompute_ref_log_probs pass runs in the trainer's constructor, untimed).

Runs in its own venv (not the repo's; it does not import dpojax):
  python3.11 -m venv /tmp/venvtrl
  /tmp/venvtrl/bin/pip install torch==2.13.0              # first: the CPU wheel
  /tmp/venvtrl/bin/pip install trl==1.16.0 torch==2.13.0  # the pin keeps pip off torch
  /tmp/venvtrl/bin/python benchmarks/trl_throughput.py                          # live reference
  /tmp/venvtrl/bin/python benchmarks/trl_throughput.py --reference=precomputed  # 6N per token
(or `pip install -e .[test]`, which installs trl==1.16.0 beside the CPU torch pin.)
TRL runs twice by default, with gradient checkpointing off (its fastest on a CPU) and on (its
DPOConfig default), and the last line names the faster: compare dpojax with that one.
--model=135m: the shape of a real 135M chat model (common.MODEL_135M: vocab 49152, hidden
576, FFN 1536, 30 layers, 9 heads, 3 KV heads, tied), random init, as train_throughput.py's.

No network: the model is built from its config (random init) and the pairs are random ids
written as text for a word-level tokenizer built in memory (TRL 1.16 always tokenizes its
train_dataset: it takes no pre-tokenized columns), which maps "t<i>" to id i exactly.

--data=hh trains on the very tokens of train_throughput.py --data=hh (HH-RLHF harmless-base
test pairs, SentencePiece test model, pairs over 512 tokens a side already dropped):
  python benchmarks/train_throughput.py --data=hh --hh_dump=/tmp/hh_pairs.jsonl   # repo venv
  /tmp/venvtrl/bin/python benchmarks/trl_throughput.py --data=hh --hh_pairs=/tmp/hh_pairs.jsonl
TRL shuffles the whole set (seed 0) and pads each batch of 8 pairs to its longest sequence
(padding_free is disabled in TRL 1.16: it warns and falls back to padding). The collator's
attention mask comes from the sequence lengths, not from pad ids, but the pad id is still the
embedding's padding_idx (a zeroed, frozen row), so the pad is an id the pairs never use and id
0 (unk, frequent in the texts) is a token of its own. Batch lengths vary, so hh reports the
mean step time, pairs/s and real (unpadded) tokens/s over the whole timed span, FLOP/s from
real tokens, and the mean padded tokens per step (what TRL computes on).
"""

import argparse
import copy
import resource
import json
import os
import statistics
import tempfile
import time

# No hub look-ups: everything here is built in memory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute progress bar.

import datasets  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

N_PARAMS = 3_158_272  # benchmarks/common.py's MODEL.
VOCAB, PAD, BOS, EOS = 1000, 0, 1, 2  # Random ids are drawn from [3, VOCAB), as ours.
UNK = 0  # --data=hh: the SentencePiece model's unk, which occurs in the texts.


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", type=int, default=8, help="pairs per step")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--steps", type=int, default=None,
                 help="timed steps (fixed: 10, median reported; hh: 20, mean reported)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--reference", default="copy", choices=("copy", "precomputed"))
  p.add_argument("--data", default="fixed", choices=("fixed", "hh"))
  p.add_argument("--gradient_checkpointing", default="both", choices=("both", "on", "off"),
                 help="TRL 1.16 recomputes activations by default (DPOConfig's "
                      "gradient_checkpointing=True); off is its fastest setting on a CPU; "
                      "both: one run of each (off first), and the faster is reported")
  p.add_argument("--model", default="issue10", choices=tuple(MODELS),
                 help="issue10: benchmarks/common.MODEL; 135m: a real 135M chat model's "
                      "shape (common.MODEL_135M); tiny: one small layer (smoke tests)")
  p.add_argument("--hh_pairs", default=None,
                 help="--data=hh: JSONL from train_throughput.py --data=hh --hh_dump=PATH")
  args = p.parse_args()
  if args.steps is None:
    args.steps = 20 if args.data == "hh" else 10  # More hh steps: their lengths vary.
  if args.data == "hh" and not args.hh_pairs:
    p.error("--data=hh needs --hh_pairs=PATH")
  return args


# benchmarks/common.py's models (this script does not import dpojax): vocab, hidden, FFN,
# layers, heads, KV heads, parameters (tied embeddings counted once).
MODELS = {"issue10": (VOCAB, 256, 688, 4, 8, 4, N_PARAMS),
          "135m": (49152, 576, 1536, 30, 9, 3, 134_515_008),
          "tiny": (VOCAB, 32, 64, 1, 2, 1, 41_312)}


def make_model(pad=PAD, name="issue10"):
  vocab, hidden, ffn, layers, heads, kv_heads, _ = MODELS[name]
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True,
      max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
      attention_bias=False, mlp_bias=False, pad_token_id=pad, bos_token_id=BOS,
      eos_token_id=EOS)
  return transformers.LlamaForCausalLM(config).to(torch.float32)


def make_tokenizer(pad=PAD):
  """Word-level, whitespace split, no post-processor: no BOS is added, "t<i>" is id i.
  With pad != 0 (hh), id 0 is "<unk>" and the pad is "<pad>" in place of "t<pad>"."""
  vocab = {"<pad>": pad, "<s>": BOS, "</s>": EOS}
  if pad != UNK:
    vocab["<unk>"] = UNK
  vocab.update({f"t{i}": i for i in range(3, VOCAB) if i != pad})
  unk = "<pad>" if pad == UNK else "<unk>"  # Fixed: no unk in the data; "<pad>" stands in.
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
      **({} if pad == UNK else {"unk_token": unk}))


def text(ids):
  """Ids as make_tokenizer's words; the special ones are added tokens, matched before the split."""
  return " ".join({UNK: "<unk>", BOS: "<s>", EOS: "</s>"}.get(i, f"t{i}") for i in ids)


def make_pairs(args, rng):
  """Shared prompt, two random responses. TRL appends EOS to a response that lacks it, so
  each response is response - 1 random ids and EOS: sequences stay exactly --seq long."""
  response = args.seq - args.prompt
  rows, ids = [], []
  for _ in range((args.warmup + args.steps) * args.pairs):
    prompt = torch.randint(3, VOCAB, (args.prompt,), generator=rng)
    chosen, rejected = (torch.cat([torch.randint(3, VOCAB, (response - 1,), generator=rng),
                                   torch.tensor([EOS])]) for _ in range(2))
    # The space ends the prompt on a word boundary: TRL concatenates prompt + response text.
    rows.append({"prompt": text(prompt.tolist()) + " ", "chosen": text(chosen.tolist()),
                 "rejected": text(rejected.tolist())})
    ids.append([x.tolist() for x in (prompt, chosen, rejected)])
  return datasets.Dataset.from_list(rows), ids


def load_hh(path):
  """train_throughput.py's dumped HH pairs as text, and a pad id none of them uses."""
  with open(path) as f:
    ids = [[pair[k] for k in ("prompt", "chosen", "rejected")] for pair in map(json.loads, f)]
  used = set()
  for prompt, chosen, rejected in ids:
    # Responses already end with EOS, so TRL's add_eos leaves them alone (checked after).
    assert prompt[0] == BOS and chosen[-1] == EOS and rejected[-1] == EOS
    used.update(prompt, chosen, rejected)
  pad = max(set(range(3, VOCAB)) - used)  # max() fails loudly if every id is used.
  rows = [{"prompt": text(p) + " ", "chosen": text(c), "rejected": text(r)} for p, c, r in ids]
  return datasets.Dataset.from_list(rows), ids, pad


class StepTimer(transformers.TrainerCallback):
  """Wall time of each optimizer step (forward, backward, clip, AdamW, zero_grad)."""

  def __init__(self):
    self.times = []

  def on_step_begin(self, args, state, control, **kwargs):
    self.start = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.times.append(time.perf_counter() - self.start)


class BatchTokens:
  """The trainer's collator, counting each batch's real and padded tokens in the order the
  train loop fetches them (batch i is step i's; the fetch precedes the step's clock)."""

  def __init__(self, collate):
    self.collate, self.real, self.padded = collate, [], []

  def __call__(self, examples):
    batch = self.collate(examples)
    real = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
               for e in examples)
    # The mask must cover exactly the pairs' tokens: no pad id taken for content.
    assert int(batch["attention_mask"].sum()) == real, (int(batch["attention_mask"].sum()), real)
    self.real.append(real)
    self.padded.append(batch["input_ids"].numel())
    return batch


def matmul_peak(n=2048, repeats=5):
  """Best fp32 FLOP/s of an n x n x n product, as benchmarks/common.matmul_peak."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)  # Warm-up: first-call allocation and thread-pool start.
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def main():
  args = parse()
  if args.data == "hh":
    train_dataset, ids, pad = load_hh(args.hh_pairs)
  else:
    train_dataset, ids = make_pairs(args, torch.Generator().manual_seed(0))
    pad = PAD
  peak = matmul_peak()
  settings = ("off", "on") if args.gradient_checkpointing == "both" else (
      args.gradient_checkpointing,)
  results = {gc: train(args, gc, train_dataset, ids, pad, peak) for gc in settings}
  best = max(results, key=results.get)
  print(f"trl fastest: gradient_checkpointing={best} pairs/s={results[best]:.2f} ("
        + ", ".join(f"{gc}: {r:.2f}" for gc, r in results.items()) + ") "
        f"peak_rss_gib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}",
        flush=True)


def train(args, gradient_checkpointing, train_dataset, ids, pad, peak) -> float:
  """One TRL training run (a fresh model from seed 0); prints its line, returns pairs/s."""
  torch.manual_seed(0)
  model = make_model(pad, args.model)
  n_params = sum(p.numel() for p in model.parameters())  # Tied: the embedding counts once.
  assert n_params == MODELS[args.model][-1], n_params
  # TRL's own default reloads the policy from its hub id, which a config-built model lacks:
  # a frozen copy of the initial weights is what that reload would give.
  ref_model = copy.deepcopy(model).eval() if args.reference == "copy" else None
  tokenizer = make_tokenizer(pad)
  tokens = 2 * args.pairs * args.seq
  flops_per_token = (8 if args.reference == "copy" else 6) * n_params
  print(f"torch={torch.__version__} transformers={transformers.__version__} "
        f"trl={trl.__version__} threads={torch.get_num_threads()} params={n_params:,} "
        f"attention={model.config._attn_implementation} pairs/step={args.pairs} "
        f"reference={args.reference} gradient_checkpointing={gradient_checkpointing} "
        f"model={args.model} "
        f"matmul_peak={peak / 1e9:.1f}G data={args.data}"
        + (f" pairs={len(ids)} pad_id={pad}" if args.data == "hh" else ""), flush=True)

  timer = StepTimer()
  with tempfile.TemporaryDirectory() as out:
    config = trl.DPOConfig(
        output_dir=out, beta=0.1, loss_type=["sigmoid"], learning_rate=1e-4,
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, max_length=None,  # No truncation.
        precompute_ref_log_probs=args.reference == "precomputed", use_cpu=True,
        bf16=False, fp16=False, dataloader_num_workers=0, report_to="none",
        eval_strategy="no", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        gradient_checkpointing=gradient_checkpointing == "on", seed=0)
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=config,
                             train_dataset=train_dataset, processing_class=tokenizer,
                             callbacks=[timer])
    # The tokenizer must give back our ids exactly (so no BOS or EOS added: each response
    # keeps its one final EOS), and the collator one row per sequence.
    for i in range(len(ids)):
      row = trainer.train_dataset[i]
      assert [row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]] == ids[i], i
    if args.data == "hh":  # After the constructor: precompute's pass is not counted.
      trainer.data_collator = counter = BatchTokens(trainer.data_collator)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])
    if args.data == "hh":
      counter.real, counter.padded = [], []  # That was a sample, not a step's batch.
    print(f"collated batch: input_ids={list(batch['input_ids'].shape)} "
          f"attention_mask.sum={int(batch['attention_mask'].sum())} "
          f"completion_mask.sum={int(batch['completion_mask'].sum())} "
          f"keys={sorted(batch)}", flush=True)
    if args.data == "fixed":
      assert list(batch["input_ids"].shape) == [2 * args.pairs, args.seq]
      assert int(batch["attention_mask"].sum()) == tokens
    trainer.train()
    print(f"optimizer={type(trainer.optimizer.optimizer).__name__}"
          f"{trainer.optimizer.optimizer.defaults.get('fused') and ' (fused)' or ''}")

  assert len(timer.times) == args.warmup + args.steps, len(timer.times)
  if args.data == "hh":
    assert len(counter.real) >= args.warmup + args.steps, len(counter.real)  # + prefetch.
    timed = slice(args.warmup, args.warmup + args.steps)
    total, real = sum(timer.times[timed]), sum(counter.real[timed])
    flops = flops_per_token * real / total
    print(f"trl hh (gradient_checkpointing {gradient_checkpointing}): step_time_s={total / args.steps:.4f} pairs/step={args.pairs} "
          f"pairs/s={args.pairs * args.steps / total:.2f} real_tokens/s={real / total:.0f} "
          f"real_tokens/step={real / args.steps:.0f} "
          f"padded_tokens/step={sum(counter.padded[timed]) / args.steps:.0f} "
          f"model_flops/s({flops_per_token // n_params}N)={flops / 1e9:.1f}G "
          f"ratio={flops / peak:.1%} matmul_peak={peak / 1e9:.1f}G", flush=True)
    return args.pairs * args.steps / total
  step = statistics.median(timer.times[args.warmup:])
  flops = flops_per_token * tokens / step
  print(f"trl fixed {args.seq} (gradient_checkpointing {gradient_checkpointing}): step_time_s={step:.4f} pairs/step={args.pairs} "
        f"pairs/s={args.pairs / step:.2f} tokens/s={tokens / step:.0f} "
        f"model_flops/s({flops_per_token // n_params}N)={flops / 1e9:.1f}G "
        f"ratio={flops / peak:.1%} matmul_peak={peak / 1e9:.1f}G", flush=True)
  return args.pairs / step


if __name__ == "__main__":
  main()
