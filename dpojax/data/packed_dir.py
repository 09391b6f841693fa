"""Packed directories (written by `python -m dpojax.pack`): the arrays of a packed epoch,
read with their metadata checked, and written atomically."""

from __future__ import annotations

import json
import os

import numpy as np

from dpojax.data import packing
from dpojax.data.sources import DataError

PACKED_FORMAT = "dpojax-packed-v1"


# --- packed directories (written by `python -m dpojax.pack`) --------------------------------
# Pairs are stored in row order; row r holds pairs row_starts[r]:row_starts[r+1], and pair i's
# chosen then rejected tokens start at tokens[pair_offsets[i]].
PACKED_ARRAYS = ("tokens", "row_starts", "pair_offsets", "prompt_len", "chosen_len",
                 "rejected_len", "chosen_reward", "rejected_reward", "line")


def packing_stats(data, row_starts: np.ndarray, items: np.ndarray) -> dict:
  """A PreferenceData's packing statistics plus the padded layout's efficiency, for logs."""
  out = packing.stats(data.row_lengths[items], row_starts, data.packed_size)
  out["pack_size"] = data.packed_size
  out["padded_efficiency"] = float(data.pair_lengths.sum() / max(
      2 * len(data) * data.opts.max_seq_length, 1))
  return out


def read_packed_meta(path: str) -> dict:
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise DataError(f"{path}: a directory without meta.json is not a packed dataset "
                    "(python -m dpojax.pack writes one)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{meta_path}: invalid JSON ({e})") from None
  if meta.get("format") != PACKED_FORMAT:
    raise DataError(f"{meta_path}: field 'format': expected {PACKED_FORMAT!r}, got "
                    f"{meta.get('format')!r}")
  for name in PACKED_ARRAYS:
    if not os.path.isfile(os.path.join(path, f"{name}.npy")):
      raise DataError(f"{path}: missing {name}.npy")
  return meta


def write_packed(data, out_dir: str, *, strategy: str, seed: int,
                 extra_meta: dict | None = None) -> dict:
  """Packs `data` (a JSONL split's pipeline.PreferenceData) and writes it under `out_dir`
  (.npy arrays + meta.json, no pickles); returns the statistics. Written to a temporary
  directory, then renamed."""
  pack_size = data.opts.resolved_pack_size
  row_starts, items = packing.pack(data.row_lengths, pack_size, strategy, seed=seed)
  n, total = len(items), int(data.pair_lengths.sum())
  tokens = np.zeros(total, np.int32)
  pair_offsets = np.zeros(n, np.int64)
  rewards = np.full((n, 2), np.nan, np.float32)
  lines = np.zeros(n, np.int64)
  pos = 0
  for j, i in enumerate(items.tolist()):
    pair = data[i]
    pair_offsets[j] = pos
    for side, name in enumerate(("chosen", "rejected")):
      tokens[pos:pos + len(pair[name])] = pair[name]
      pos += len(pair[name])
      if pair[f"{name}_reward"] is not None:
        rewards[j, side] = pair[f"{name}_reward"]
    lines[j] = pair["line"]
  assert pos == total
  stats = dict(data.stats)
  stats.update(packing_stats(data, row_starts, items))
  opts = data.opts
  meta = {"format": PACKED_FORMAT, "pack_size": pack_size, "strategy": strategy, "seed": seed,
          "max_seq_length": opts.max_seq_length, "template": opts.template,
          "add_bos": opts.add_bos, "append_eos": opts.append_eos, "boundary": opts.boundary,
          "share_prompt": data.share_prompt, "truncation": opts.truncation, "source": data.path,
          "tokenizer_path": data.tok.path, "tokenizer_sha256": data.tok.sha256,
          "stats": stats, **(extra_meta or {})}
  arrays = {"tokens": tokens, "row_starts": row_starts, "pair_offsets": pair_offsets,
            "prompt_len": data.prompt_len[items], "chosen_len": data.chosen_len[items],
            "rejected_len": data.rejected_len[items], "chosen_reward": rewards[:, 0],
            "rejected_reward": rewards[:, 1], "line": lines}
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
  os.makedirs(tmp, exist_ok=False)
  for name, value in arrays.items():
    np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(value), allow_pickle=False)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, out_dir)
  return stats
