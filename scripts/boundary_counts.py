"""Pairs whose tokens differ from `encode(prompt + response)`, before and after data.boundary.

  python scripts/boundary_counts.py [--data FILE.jsonl[.gz] ...] [--tokenizer TOK.model ...]

For every (data file, tokenizer) it tokenizes each pair as training does under the plain
template, with data.boundary=apart (prompt and response each alone: dpojax before the option)
and joint (the default), and compares both sides with [BOS] + sp.encode(prompt_text +
response_text) + [EOS], the joint tokenization TRL uses. `straddled`: pairs where a piece
crosses the boundary, so joint mode falls back to apart (and is counted at start-up).
Defaults: the repo's tokenizers and HH-RLHF data (../shared/data when present).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from dpojax.data import pipeline, templates
from dpojax.data.tokenize import Tokenizer, tokenize_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
DATA = [os.path.join(ROOT, "tests", "testdata", "hh-rlhf", "harmless-base-test-slice.jsonl.gz"),
        os.path.join(SHARED, "hh-rlhf", "harmless-base", "test.jsonl.gz"),
        os.path.join(ROOT, "dpojax", "assets", "toy_prefs_train.jsonl")]
TOKENIZERS = [os.path.join(ROOT, "dpojax", "assets", "tokenizer.model"),
              os.path.join(ROOT, "tests", "testdata", "stories260k", "hf", "tokenizer.model"),
              os.path.join(SHARED, "tokenizers", "sentencepiece-test", "test_model.model")]


def counts(data_path: str, tok: Tokenizer, cache_dir: str) -> dict:
  opts = pipeline.DataOptions(max_seq_length=1 << 30, on_error="skip", cache_dir=cache_dir)
  data = pipeline.PreferenceData(data_path, tok, opts)
  out = {"pairs": len(data), "apart_differs": 0, "joint_differs": 0, "straddled": 0}
  for i in data.indices:
    record = data.source[int(i)]
    (prompt,), responses = templates.render(record, "plain")
    pairs = {b: tokenize_pair(record, tok, boundary=b) for b in ("apart", "joint")}
    for b, pair in pairs.items():
      out[f"{b}_differs"] += any(
          pair[s].tolist() != [tok.bos_id] + tok.encode(prompt + responses[s][0]) + [tok.eos_id]
          for s in ("chosen", "rejected"))
    out["straddled"] += pairs["joint"]["straddled"] > 0
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", nargs="+", default=[d for d in DATA if os.path.exists(d)])
  p.add_argument("--tokenizer", nargs="+", default=[t for t in TOKENIZERS if os.path.exists(t)])
  args = p.parse_args()
  print("| data | tokenizer | pairs | differ, apart | differ, joint | straddled |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as cache:
    for data_path in args.data:
      for tok_path in args.tokenizer:
        c = counts(data_path, Tokenizer(tok_path), cache)
        print(f"| {os.path.relpath(data_path, ROOT)} | {os.path.relpath(tok_path, ROOT)} | "
              f"{c['pairs']} | {c['apart_differs']} | {c['joint_differs']} | "
              f"{c['straddled']} |", flush=True)


if __name__ == "__main__":
  main()
