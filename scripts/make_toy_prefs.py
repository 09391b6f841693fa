"""Writes the toy preference data and its tokenizer, shipped in dpojax/assets.

Fixed seed; all text is generated here, and the SentencePiece model is trained here on it
(byte fallback, so any text tokenizes without <unk>), so both are license-clean.

Two families a small model can learn from scratch:
  counting: the chosen answer counts up by one; the rejected one counts by two, counts
    down, or skips a number;
  helpfulness: the chosen answer helps with the named topic; the rejected one refuses.
Run: python scripts/make_toy_prefs.py [--out DIR]  (default: dpojax/assets)
tests/test_scripts.py regenerates all three files into a temp folder and checks that they are
byte-identical to the shipped ones.
"""

import argparse
import io
import json
import os
import random

import sentencepiece as spm

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dpojax", "assets")
TOPICS = ["cats", "dogs", "trees", "rivers", "the moon", "bread", "music", "trains", "rain",
          "birds", "ships", "tea", "snow", "books", "stars", "horses", "apples", "bees"]
ADJECTIVES = ["lovely", "curious", "useful", "old", "bright", "simple", "famous", "quiet"]
REFUSALS = ["No. Ask someone else.", "I will not do that.", "Not my problem.",
            "Figure it out yourself.", "No, go away."]


def counting(rng):
  start = rng.randint(0, 30)
  n = rng.randint(4, 7)
  good = list(range(start, start + n))
  kind = rng.choice(["by_two", "backwards", "skip"])
  if kind == "by_two":
    bad = list(range(start, start + 2 * n, 2))
  elif kind == "backwards":
    bad = good[::-1]
  else:
    i = rng.randint(1, n - 2)
    bad = good[:i] + [x + 1 for x in good[i:]]
  prompt = f"Count from {good[0]} to {good[-1]}."
  return prompt, " ".join(map(str, good)), " ".join(map(str, bad))


def helpfulness(rng):
  topic = rng.choice(TOPICS)
  prompt = f"Please tell me about {topic}."
  chosen = f"Sure! {topic.capitalize()} are {rng.choice(ADJECTIVES)}. Happy to help."
  return prompt, chosen, rng.choice(REFUSALS)


def make(n, rng):
  rows = []
  for _ in range(n):
    prompt, chosen, rejected = (counting if rng.random() < 0.6 else helpfulness)(rng)
    rows.append({"prompt": prompt, "chosen_response": chosen, "rejected_response": rejected})
  return rows


def train_tokenizer(rows, out):
  text = [r[k] for r in rows for k in ("prompt", "chosen_response", "rejected_response")]
  # Written through model_writer, not model_prefix: the model then records no output path
  # (its trainer_spec.model_prefix stays empty), so the bytes are the same in any folder.
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model,
      vocab_size=384, model_type="unigram", byte_fallback=True, character_coverage=1.0,
      bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
  with open(os.path.join(out, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=ASSETS, help="folder to write into (default dpojax/assets)")
  out = p.parse_args().out
  os.makedirs(out, exist_ok=True)
  rng = random.Random(1234)
  splits = {"train": make(2000, rng), "val": make(200, rng)}
  for name, rows in splits.items():
    with open(os.path.join(out, f"toy_prefs_{name}.jsonl"), "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  train_tokenizer(splits["train"], out)


if __name__ == "__main__":
  main()
