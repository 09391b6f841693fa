"""Checkpoint files in either format: NeMo `.nemo` (a file or extracted folder) and Hugging
Face folders of the families formats/hf_config.py maps.

  cfg, params, tokenizer_path = checkpoints.load(path)    # .nemo file/folder or HF folder
  checkpoints.save(path, cfg, params, tokenizer_path)     # format from the path (or `format=`)

The command line (dpojax/convert.py) adds dpojax workdirs as a source.
"""

from __future__ import annotations

import os
import tarfile

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
                        f"{nemo.CONFIG_NAME}) nor a Hugging Face folder with {hf.CONFIG} (nor a dpojax "
                        "workdir with run_config.json, which `python -m dpojax.convert` and "
                        "init.path also take)")


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
