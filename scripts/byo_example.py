"""Writes a "bring your own model and data" example from the shipped toy pairs: a checkpoint-
style tokenizer folder (byte-level BPE tokenizer.json trained here, no BOS, a ChatML Jinja
chat_template in tokenizer_config.json, generation_config.json) and conversational Parquet
files (UltraFeedback-binarized shape: whole `chosen`/`rejected` conversations, the prompt
implicit, score_chosen/score_rejected), for README's end-to-end commands:

  python scripts/byo_example.py /tmp/byo
  python -m dpojax.main --config=configs/dpo_gpt.py --workdir=/tmp/byo_run \\
      --config.data.tokenizer_path=/tmp/byo/model --config.data.template=auto \\
      --config.data.train_path=/tmp/byo/train.parquet --config.data.val_path=/tmp/byo/val.parquet

With --model, /tmp/byo/model is a whole Hugging Face chat checkpoint (a small random
Llama-architecture model.safetensors and config.json beside the tokenizer, written by dpojax's
own exporter; needs `pip install -e '.[hf]'`), for README's chat-model walk-through:
`--config.init.path=/tmp/byo/model` alone then brings the model, tokenizer and template.
"""

import argparse
import json
import os

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dpojax import convert, model

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dpojax",
                      "assets")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's / Qwen 2's pre-tokenizer split.
SYSTEM = "You are a helpful assistant."


def read_toy(name):
  with open(os.path.join(ASSETS, name)) as f:
    return [json.loads(line) for line in f if line.strip()]


def conversation(record, i):
  prompt = ([{"role": "system", "content": SYSTEM}] if i % 2 else []) + [
      {"role": "user", "content": record["prompt"]}]
  return {"chosen": prompt + [{"role": "assistant", "content": record["chosen_response"]}],
          "rejected": prompt + [{"role": "assistant", "content": record["rejected_response"]}],
          "score_chosen": 1.0, "score_rejected": 0.0}


def write_tokenizer(folder, texts, vocab_size=384):
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(folder, exist_ok=True)
  tk.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
               "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML},
              f, indent=1)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")]},
              f)
  return tk.get_vocab_size()


def write_model(folder, vocab_size):
  """A random Llama-architecture chat checkpoint in `folder`, beside its tokenizer (which the
  exporter copies back with its chat template); the model is sized like configs/dpo_gpt.py's."""
  cfg = model.ModelConfig(
      vocab_size=vocab_size, hidden_size=64, ffn_hidden_size=192, num_layers=2,
      num_attention_heads=4, num_query_groups=2, activation="swiglu", normalization="rmsnorm",
      position_embedding_type="rope", share_embeddings_and_output_weights=True,
      max_position_embeddings=512)
  params = jax.device_get(model.init_params(cfg, jax.random.key(0)))
  stage = folder + ".export"
  convert.save(stage, cfg, params, os.path.join(folder, "tokenizer.json"), overwrite=True)
  for name in os.listdir(stage):
    os.replace(os.path.join(stage, name), os.path.join(folder, name))
  os.rmdir(stage)


def main(out, with_model=False):
  train, val = read_toy("toy_prefs_train.jsonl"), read_toy("toy_prefs_val.jsonl")
  texts = [t for r in train for t in (r["prompt"], r["chosen_response"], r["rejected_response"])]
  vocab = write_tokenizer(os.path.join(out, "model"), texts + [SYSTEM, "user assistant system"])
  if with_model:
    write_model(os.path.join(out, "model"), vocab)
  for name, records in (("train", train), ("val", val)):
    rows = [conversation(r, i) for i, r in enumerate(records)]
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, f"{name}.parquet"))
  print(f"{out}/model: {'a chat checkpoint, ' if with_model else ''}tokenizer.json "
        f"({vocab} tokens), ChatML chat_template; "
        f"{out}/train.parquet ({len(train)} pairs), {out}/val.parquet ({len(val)} pairs)")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("out", nargs="?", default="/tmp/byo")
  parser.add_argument("--model", action="store_true",
                      help="also write a random chat model beside the tokenizer")
  args = parser.parse_args()
  main(args.out, args.model)
