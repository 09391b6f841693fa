"""NeMo 1.x Megatron GPT `.nemo` files: import (every weight layout) and export (torch_dist).

A .nemo is a tar (plain, or gzip before NeMo 1.7) holding `model_config.yaml`, the weights and
artifacts such as the SentencePiece tokenizer (`tokenizer.model: nemo:<hex>_<name>`). Weights
come as one `model_weights.ckpt`, as per-rank `mp_rank_XX/` or `tp_rank_XX_pp_rank_YYY/` files
(merged here), or as a megatron-core distributed checkpoint `model_weights/` (torch_dist or zarr)
whose per-layer tensors are stacked on a leading layer axis, the dpojax layout too.

Safety: tar members are read in place (never extracted), and a file with an absolute, `..`,
link or special member is refused whole. Tensors are unpickled with torch's weights_only loader;
the distributed checkpoint's `.metadata` pickle goes through an allow-list unpickler;
`_extra_state` payloads and `common.pt` are never unpickled.

Layouts (torch Linear weights are [out, in]; dpojax kernels are [in, ...out]):
  linear_qkv  [L, G*(N/G+2)*K, D]: per query group, N/G query heads then k then v.
  linear_fc1  [L, 2F, D] = [gate; up] when gated.

This module: load_nemo / save_nemo over the pieces: nemo_archive (the tar, read in place),
nemo_config (model_config.yaml), nemo_weights (every weight layout in, torch_dist out),
nemo_mcore (distributed-checkpoint names <-> dpojax params).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tarfile
import tempfile
import uuid

import numpy as np
import sentencepiece as spm

from dpojax.formats.convert_common import (
    CheckpointError, Fields, Loaded, check_params, check_tensors, dtype_name, unflatten)
from dpojax.formats.nemo_archive import Archive, CONFIG_NAME, WEIGHTS_DIR, _clean_tarinfo
from dpojax.formats.nemo_config import config_from_yaml, config_to_yaml, read_config, refuse_moe
from dpojax.formats.nemo_mcore import (
    EXTRA_STATE_MODULES, MEGATRON_CORE, mcore_shapes, mcore_to_params, params_to_mcore)
from dpojax.formats.nemo_weights import _ignored, _write_torch_dist, read_weights
from dpojax.model import ModelConfig

# ---------------------------------------------------------------------------------------------
# Public API.


def load_nemo(path: str, extract_dir: str | None = None) -> Loaded:
  """(ModelConfig, params as numpy in the dpojax layout, tokenizer path or None).

  The tokenizer stored in the file is written to `extract_dir` (default: a new temporary
  folder); nothing else is written anywhere.
  """
  with Archive(path) as archive:
    f = read_config(archive)
    act = f.get("activation")
    state, layout = read_weights(archive, f, gated=isinstance(act, str) and act.endswith("glu"))
    source = f"{path} ({layout} weights)"
    emb = state.get("model.embedding.word_embeddings.weight")
    if emb is None or emb.ndim != 2:
      raise CheckpointError(f"{source}: missing tensors: model.embedding.word_embeddings.weight")
    # The vocab is the (possibly padded) table's size; padding rows are kept.
    cfg = config_from_yaml(f, emb.shape[0], dtype_name(emb.dtype))
    if cfg.share_embeddings_and_output_weights and "model.output_layer.weight" in state:
      if not np.array_equal(state["model.output_layer.weight"], emb):
        raise CheckpointError(f"{source}: model.output_layer.weight differs from the "
                              f"embedding but {f.where('share_embeddings_and_output_weights')} "
                              "is true")
      del state["model.output_layer.weight"]
    check_tensors(source, mcore_shapes(cfg), state, ignored=_ignored)
    dtypes = sorted({v.dtype.name for v in state.values()})
    if len(dtypes) > 1:
      raise CheckpointError(f"{source}: tensors mix dtypes {dtypes}")
    params = mcore_to_params(state, cfg)
    check_params(cfg, params, source)
    tokenizer = _extract_tokenizer(archive, f, extract_dir)
  return Loaded(cfg, params, tokenizer)


def read_nemo_config(path: str) -> dict:
  """The raw model_config.yaml of a .nemo (to carry its non-architecture keys to an export)."""
  with Archive(path) as archive:
    return dict(read_config(archive).data)


def _extract_tokenizer(archive: Archive, f: Fields, extract_dir: str | None) -> str | None:
  tok = f.get("tokenizer")
  if not isinstance(tok, dict) or not isinstance(tok.get("model"), str):
    return None  # E.g. a Hugging Face tokenizer named by hub id: not packaged in the file.
  ref = tok["model"]
  member = ref[len("nemo:"):] if ref.startswith("nemo:") else os.path.basename(ref)
  if "/" in member or member in ("", ".", ".."):
    raise f.error("tokenizer.model", f"{ref!r} is not a file inside the .nemo")
  if not archive.has(member):
    if ref.startswith("nemo:"):
      raise f.error("tokenizer.model", f"{ref!r}: no such member in {archive.path}")
    return ref if os.path.isfile(ref) else None
  extract_dir = extract_dir or tempfile.mkdtemp(prefix="dpojax-nemo-")
  os.makedirs(extract_dir, exist_ok=True)
  out = os.path.join(extract_dir, member)
  with archive.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
  return out


def _vocab_divisor(vocab_size: int, tokenizer_path: str | None) -> int:
  """make_vocab_size_divisible_by that makes NeMo pad the tokenizer's vocab to our table."""
  if tokenizer_path is None:
    return 1

  n = spm.SentencePieceProcessor(model_file=tokenizer_path).vocab_size()
  if n > vocab_size:
    raise CheckpointError(f"{tokenizer_path}: tokenizer has {n} pieces but the model's "
                          f"vocab_size is {vocab_size}")
  for d in (128, 64, 32, 16, 8, 4, 2, 1):
    if -(-n // d) * d == vocab_size:
      return d
  return vocab_size


def save_nemo(path: str, cfg: ModelConfig, params, tokenizer_path: str | None = None, *,
              base_config: dict | None = None, megatron_core: str = MEGATRON_CORE):
  """Writes a .nemo (megatron-core torch_dist weights) that NeMo and megatron-core load.

  `base_config`: a model_config.yaml mapping (e.g. `read_nemo_config(source)`) whose
  non-architecture keys (data, optim, precision plugins, ...) are kept. `megatron_core`: the
  version whose keys the checkpoint holds, exactly (a strict load refuses any other set):
  "0.15" for 0.15.0 and later, "0.14" for 0.14 and earlier with Transformer Engine.
  """
  import yaml  # pylint: disable=g-import-not-at-top

  if megatron_core not in EXTRA_STATE_MODULES:
    raise CheckpointError(f"save_nemo({path}): megatron_core={megatron_core!r} is not one of "
                          f"{sorted(EXTRA_STATE_MODULES)}")

  refuse_moe(cfg)  # Before any work: megatron-core's MoE layout is not written.
  flat = check_params(cfg, params, f"save_nemo({path})")
  cfg = dataclasses.replace(cfg, param_dtype=dtype_name(flat["embedding"].dtype))
  tensors = params_to_mcore(unflatten(flat), cfg)
  if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
    raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
  if tokenizer_path is not None and not tokenizer_path.endswith(".model"):
    # NeMo packages a SentencePiece model; a tokenizer.json it names by hub id or folder,
    # which would not travel with the file.
    raise CheckpointError(
        f"save_nemo({path}): a .nemo holds a SentencePiece tokenizer.model, and this model's "
        f"tokenizer is {tokenizer_path}; export to a Hugging Face folder instead (a --to "
        "path not ending in .nemo)")
  out_dir = os.path.dirname(os.path.abspath(path))
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".dpojax-nemo-", dir=out_dir) as stage:
    member = None
    if tokenizer_path is not None:
      # NeMo names artifacts <uuid4 hex>_<basename>; drop the prefix of an imported one.
      base = re.sub(r"^[0-9a-f]{32}_", "", os.path.basename(tokenizer_path))
      member = f"{uuid.uuid4().hex}_{base}"
      shutil.copyfile(tokenizer_path, os.path.join(stage, member))
    doc = config_to_yaml(cfg, member, _vocab_divisor(cfg.vocab_size, tokenizer_path),
                         base_config)
    with open(os.path.join(stage, CONFIG_NAME), "w") as fh:
      yaml.safe_dump(doc, fh, sort_keys=False)
    _write_torch_dist(os.path.join(stage, WEIGHTS_DIR), tensors, cfg.num_layers, megatron_core)
    partial = os.path.join(stage, "out.nemo")
    with tarfile.open(partial, "w:") as tar:  # Uncompressed, members '.', './...' as NeMo's.
      tar.add(stage, arcname=".", filter=_clean_tarinfo)
    os.replace(partial, path)  # Atomic: a crash never leaves a half-written .nemo.
