"""Checkpoint conversion: a dpojax workdir, a .nemo or a Hugging Face folder in, a .nemo or a
Hugging Face folder out.

Command line (every direction; the output format comes from the path or --format):
  python -m dpojax.convert --from WORKDIR --to hf_dir/          # a trained run's policy
  python -m dpojax.convert --from WORKDIR/checkpoints/200 --to hf_dir/
  python -m dpojax.convert --from model.nemo --to hf_dir/
  python -m dpojax.convert --from hf_dir/ --to model.nemo

A workdir gives its latest checkpoint (or the `checkpoints/<step>` / `best/<step>` folder
named), LoRA adapters merged into their base, with the run's tokenizer and (a .nemo run) the
source's NeMo config: the same files as the run's own `export.to`.

Library (formats/checkpoints.py, re-exported here):
  cfg, params, tokenizer_path = convert.load(path)       # .nemo file/folder or HF folder
  convert.save(path, cfg, params, tokenizer_path)        # format from the path (or `format=`)
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from dpojax import cli
from dpojax import pretrained
from dpojax import workdir as workdir_lib
from dpojax.formats import nemo
from dpojax.formats.checkpoints import (ARCHITECTURE_FIELDS, FORMATS, CheckpointError, Loaded,
                                        detect_format, is_checkpoint, load, save)

__all__ = ["ARCHITECTURE_FIELDS", "CheckpointError", "FORMATS", "Loaded", "detect_format",
           "is_checkpoint", "load", "save"]


def main(argv=None) -> int:
  return cli.run(_main, argv)


def load_source(src: str, tmp: str):
  """(ModelConfig, host params, tokenizer path, the NeMo config to keep or None) of a .nemo,
  a Hugging Face folder or a dpojax workdir (its policy, as the run would export it)."""
  if is_checkpoint(src) or not workdir_lib.find_config(src):
    cfg, params, tokenizer = load(src, extract_dir=tmp)
    base = nemo.read_nemo_config(src) if detect_format(src) == "nemo" else None
    return cfg, params, tokenizer, base
  policy = pretrained.load_policy(src, extract_dir=tmp)
  init = workdir_lib.init_path(policy.run_config)
  base = None
  if init and detect_format(init) == "nemo":  # As export.to: the source's training-side keys.
    base = nemo.read_nemo_config(init)
  return policy.config, policy.params, policy.tokenizer_path, base


def _main(argv) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dpojax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--from", dest="src", required=True,
                      help="a dpojax workdir (or its checkpoints/<step>, best/<step>), a .nemo "
                      "file, an extracted .nemo folder, or a Hugging Face folder")
  parser.add_argument("--to", dest="dst", required=True,
                      help="output: PATH.nemo or a Hugging Face folder")
  parser.add_argument("--format", choices=FORMATS, default=None,
                      help="output format (default: nemo if --to ends in .nemo, else hf)")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer.model or tokenizer.json to store (default: the source's)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing non-empty Hugging Face output folder")
  parser.add_argument("--megatron_core", choices=sorted(nemo.EXTRA_STATE_MODULES),
                      default=nemo.MEGATRON_CORE,
                      help="a .nemo for megatron-core 0.15.0 and later (default), or for 0.14 "
                      "and earlier with Transformer Engine; a strict load wants exact keys")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory(prefix="dpojax-convert-") as tmp:
    cfg, params, tokenizer, base = load_source(args.src, tmp)
    save(args.dst, cfg, params, args.tokenizer or tokenizer, format=args.format,
         base_config=base, overwrite=args.overwrite, megatron_core=args.megatron_core)
  n = sum(v.size for v in _leaves(params))
  print(f"Wrote {args.dst}: {n:,} parameters, {cfg.num_layers} layers, vocab "
        f"{cfg.vocab_size}, {cfg.param_dtype}")
  return 0


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])


if __name__ == "__main__":
  sys.exit(main())
