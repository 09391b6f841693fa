"""Offline packing: preference pairs (JSONL, Parquet, save_to_disk) -> a packed dataset that
training reads directly.

  python -m dpojax.pack --input IN.jsonl[.gz] --output OUT_DIR --pack_size 1024 \\
      --strategy first_fit_decreasing --seed 0 --tokenizer_path tok.model [--max_seq_length 512]

OUT_DIR holds .npy arrays and meta.json (no pickles; arrays are memory-mapped when read).
Train on it with --config.data.train_path=OUT_DIR (and the same tokenizer, template, add_bos,
append_eos and boundary; they are checked). Rows keep their packing; each epoch reorders the rows.
Prints the statistics: token efficiency (real tokens / row slots), pairs per row, dropped,
truncated and skipped pairs, and the efficiency of the padded layout for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from dpojax import cli
from dpojax.data import packed_dir, packing, pipeline
from dpojax.data.sources import FORMATS, DataError
from dpojax.data.tokenize import (BOUNDARIES, TEMPLATES, TRUNCATIONS, load_tokenizer,
                                  resolve_template)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m dpojax.pack", description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True, help="preference pairs: JSONL (or .jsonl.gz), "
                 "Parquet file or folder of shards, or a datasets.save_to_disk folder")
  p.add_argument("--output", required=True, help="directory to write")
  p.add_argument("--pack_size", type=int, required=True, help="tokens per row")
  p.add_argument("--strategy", default="first_fit_decreasing", choices=packing.STRATEGIES)
  p.add_argument("--seed", type=int, default=0, help="tie-breaking / shuffle seed")
  p.add_argument("--tokenizer_path", required=True,
                 help="SentencePiece .model, tokenizer.json, or a folder holding either")
  p.add_argument("--max_seq_length", type=int, default=0,
                 help="tokens per sequence (default pack_size // 2)")
  p.add_argument("--format", default="auto", choices=FORMATS)
  p.add_argument("--template", default="auto", choices=TEMPLATES,
                 help="auto (default, as training's): the tokenizer folder's chat template, "
                 "else plain")
  p.add_argument("--add_bos", default=True, action=argparse.BooleanOptionalAction)
  p.add_argument("--append_eos", default=True, action=argparse.BooleanOptionalAction)
  p.add_argument("--truncation", default="drop", choices=TRUNCATIONS)
  p.add_argument("--share_prompt", default=False, action=argparse.BooleanOptionalAction,
                 help="pack for data.share_prompt=True (the prompt once per pair)")
  p.add_argument("--boundary", default="joint", choices=BOUNDARIES,
                 help="prompt/response tokenization: joint (as training's default) | apart")
  p.add_argument("--on_error", default="raise", choices=pipeline.ON_ERROR)
  p.add_argument("--cache_dir", default="", help="where .gz input is decompressed")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  """Packs and returns the statistics; errors raise (`python -m` prints them as one line)."""
  args = parse_args(argv)
  if os.path.exists(args.output) and not args.overwrite:
    raise DataError(f"{args.output}: exists (pass --overwrite to replace it)")
  tok = load_tokenizer(args.tokenizer_path)
  template, warning = resolve_template(args.template, tok, "--template")
  if warning:
    print(warning, flush=True)
  opts = pipeline.DataOptions(
      max_seq_length=args.max_seq_length or args.pack_size // 2, format=args.format,
      template=template, add_bos=args.add_bos, append_eos=args.append_eos,
      truncation=args.truncation, on_error=args.on_error, packing=args.strategy,
      pack_size=args.pack_size, cache_dir=args.cache_dir, share_prompt=args.share_prompt,
      boundary=args.boundary)
  start = time.perf_counter()
  data = pipeline.PreferenceData(args.input, tok, opts)
  data.require(1, "pairs to pack")
  if os.path.isdir(args.output) and args.overwrite:
    packed_dir.read_packed_meta(args.output)  # Only ever delete a packed dataset.
    shutil.rmtree(args.output)
  stats = packed_dir.write_packed(data, args.output, strategy=args.strategy, seed=args.seed)
  stats["seconds"] = round(time.perf_counter() - start, 3)
  print(f"Packed {stats['pairs']} pairs of {args.input} into {stats['rows']} rows of "
        f"{args.pack_size} tokens ({args.strategy}, seed {args.seed}) -> {args.output}")
  print(f"  token efficiency {100 * stats['token_efficiency']:.2f}% (padded to "
        f"max_seq_length={opts.max_seq_length}: {100 * stats['padded_efficiency']:.2f}%)")
  print(f"  pairs per row {stats['pairs_per_row_mean']:.2f} (max {stats['pairs_per_row_max']})"
        f"; dropped {stats['dropped']}, truncated {stats['truncated']}, skipped "
        f"{stats['skipped']} of {stats['records']} records")
  print(json.dumps(stats, sort_keys=True))
  return stats


if __name__ == "__main__":
  sys.exit(cli.run(main))
