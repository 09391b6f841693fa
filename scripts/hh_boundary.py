"""The prompt/response token boundary with BPE tokenizers on HH-RLHF under a ChatML template.

  python scripts/hh_boundary.py [HH_JSONL_GZ]
  (default ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz, else the test slice in
  tests/testdata/hh-rlhf)

Each pair is rendered as data.template=auto renders it (dpojax.data.chat_template: the prompt
with add_generation_prompt=True, each response the rest of the full rendering). For each
tokenizer it counts the pairs where, for either response,
  split:    encode(prompt) + encode(response) != encode(prompt + response), and
  straddle: encode(prompt) is not a prefix of encode(prompt + response).
dpojax (data.boundary=joint) tokenizes prompt + response together and keeps the joint ids
when the prompt's ids are their prefix ("split" pairs are thereby tokenized exactly as the
whole text); only "straddle" pairs, where a token crosses the boundary, are tokenized apart
(encode(prompt) + encode(response)) and counted at start-up, so the loss mask stays exact.
Tokenizers: a byte-level BPE trained here on the split's own text (Llama 3 / Qwen 2 pre-
tokenizer regex, vocab 8192; and GPT-2's ByteLevel regex) and stories260K's tokenizer.json
(SentencePiece-style BPE, Metaspace, byte fallback).
"""

import json
import os
import sys

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dpojax.data import chat_template
from dpojax.data.sources import JsonlSource, RecordError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base", "test.jsonl.gz")
SLICE = os.path.join(ROOT, "tests", "testdata", "hh-rlhf", "harmless-base-test-slice.jsonl.gz")
STORIES = os.path.join(ROOT, "tests", "testdata", "stories260k", "tokenizer", "tokenizer.json")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_bpe(texts, regex: str | None, vocab_size=8192) -> tokenizers.Tokenizer:
  tk = tokenizers.Tokenizer(models.BPE())
  if regex is None:  # GPT-2's own regex.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tk


def main(path):
  source = JsonlSource(path, "hh-rlhf")
  records, invalid = [], 0
  for i in range(len(source)):
    try:
      records.append(source[i])
    except RecordError:
      invalid += 1
  rendered = [chat_template.render_pair(r, CHATML, {}) for r in records]
  texts = [p + resp for p, rs in rendered for resp in rs.values()]
  stories = tokenizers.Tokenizer.from_file(STORIES)
  stories.add_special_tokens(SPECIALS)  # ChatML's markers, as a chat model's vocabulary has.
  toks = {"byte-level BPE 8192 (Llama 3 regex)": byte_bpe(texts, LLAMA3_SPLIT),
          "byte-level BPE 8192 (GPT-2 regex)": byte_bpe(texts, None),
          "stories260K tokenizer.json (512, Metaspace)": stories}
  # For contrast: the HH text as it is ("...\n\nAssistant:" + " response"), no template.
  plain = [(r["prompt"], {s: r[s] for s in ("chosen", "rejected")}) for r in records]
  out = {"file": os.path.relpath(path, ROOT), "pairs": len(records), "invalid": invalid}
  for template, pairs in (("chatml", rendered), ("none (HH text)", plain)):
    counts = out.setdefault(template, {})
    for name, tk in toks.items():
      enc = lambda s, tk=tk: tk.encode(s, add_special_tokens=False).ids if s else []
      split = straddle = 0
      for prompt, responses in pairs:
        p = enc(prompt)
        joint = {side: enc(prompt + r) for side, r in responses.items()}
        split += any(p + enc(r) != joint[side] for side, r in responses.items())
        straddle += any(j[:len(p)] != p for j in joint.values())
      counts[name] = {"split_differs": split, "straddles": straddle}
  print(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  default = SHARED if os.path.isfile(SHARED) else SLICE
  main(sys.argv[1] if len(sys.argv) > 1 else default)
