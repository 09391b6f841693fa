"""Checkpoint import/export between NeMo `.nemo` files and Hugging Face Llama folders.

Library:
  cfg, params, tokenizer_path = convert.load(path)       # .nemo file/folder or HF folder
  convert.save(path, cfg, params, tokenizer_path)        # format from the path (or `format=`)

Command line (every direction; the format comes from the path or --format):
  python -m dpojax.convert --from model.nemo --to hf_dir/
  python -m dpojax.convert --from hf_dir/ --to model.nemo
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile

from dpojax import cli
from dpojax.formats import hf, nemo
from dpojax.formats.convert_common import ARCHITECTURE_FIELDS, CheckpointError, Loaded
from dpojax.model import ModelConfig

FORMATS = ("nemo", "hf")

__all__ = ["ARCHITECTURE_FIELDS", "CheckpointError", "FORMATS", "Loaded", "detect_format",
           "is_checkpoint", "load", "save"]


def detect_format(path: str) -> str | None:
  """'nemo' for a .nemo file or extracted .nemo folder, 'hf' for a HF folder, else None."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, nemo.CONFIG_NAME)):
      return "nemo"
    if hf.is_hf_dir(path):
      return "hf"
    return None
  if path.endswith(".nemo") or (os.path.isfile(path) and _is_tar(path)):
    return "nemo"
  return None


def is_checkpoint(path: str) -> bool:
  """True where `load` applies (so `init.path` can tell these from a dpojax workdir)."""
  return detect_format(path) is not None


def _is_tar(path: str) -> bool:

  try:
    return tarfile.is_tarfile(path)
  except OSError:
    return False


def load(path: str, *, extract_dir: str | None = None) -> Loaded:
  """(ModelConfig, numpy params in the dpojax layout, tokenizer path or None).

  A tokenizer stored inside a .nemo is written to `extract_dir` (default: a new temp folder).
  """
  fmt = detect_format(path)
  if fmt == "nemo":
    return nemo.load_nemo(path, extract_dir=extract_dir)
  if fmt == "hf":
    return hf.load_hf(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or folder")
  raise CheckpointError(f"{path}: neither a .nemo file (or extracted .nemo folder with "
                        f"{nemo.CONFIG_NAME}) nor a Hugging Face folder with {hf.CONFIG}")


def save(path: str, cfg: ModelConfig, params, tokenizer_path: str | None = None, *,
         format: str | None = None, base_config: dict | None = None,  # pylint: disable=redefined-builtin
         overwrite: bool = False, megatron_core: str = nemo.MEGATRON_CORE):
  """Writes `params` as a .nemo (path ends in .nemo) or a Hugging Face folder (otherwise).

  A .nemo is replaced atomically, with the keys of megatron-core `megatron_core` (see
  nemo.save_nemo); an existing non-empty HF folder only with overwrite=True.
  """
  fmt = format or ("nemo" if path.endswith(".nemo") else "hf")
  if fmt not in FORMATS:
    raise CheckpointError(f"format={fmt!r} is not one of {FORMATS}")
  if fmt == "nemo":
    nemo.save_nemo(path, cfg, params, tokenizer_path, base_config=base_config,
                   megatron_core=megatron_core)
  else:
    hf.save_hf(path, cfg, params, tokenizer_path, overwrite=overwrite)


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dpojax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--from", dest="src", required=True,
                      help=".nemo file, extracted .nemo folder, or Hugging Face Llama folder")
  parser.add_argument("--to", dest="dst", required=True,
                      help="output: PATH.nemo or a Hugging Face folder")
  parser.add_argument("--format", choices=FORMATS, default=None,
                      help="output format (default: nemo if --to ends in .nemo, else hf)")
  parser.add_argument("--tokenizer", default=None,
                      help="SentencePiece model to store (default: the source's own)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing non-empty Hugging Face output folder")
  parser.add_argument("--megatron_core", choices=sorted(nemo.EXTRA_STATE_MODULES),
                      default=nemo.MEGATRON_CORE,
                      help="a .nemo for megatron-core 0.15.0 and later (default), or for 0.14 "
                      "and earlier with Transformer Engine; a strict load wants exact keys")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory(prefix="dpojax-convert-") as tmp:
    cfg, params, tokenizer = load(args.src, extract_dir=tmp)
    base = None
    if detect_format(args.src) == "nemo":
      base = nemo.read_nemo_config(args.src)  # Keep the source's training-side keys.
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
