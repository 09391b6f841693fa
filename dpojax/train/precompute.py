"""reference.mode=precomputed: one forward pass over the train and validation data before
training gives each pair's reference log-prob sums, cached on disk.

The cache key covers the data, the model (a fingerprint of the weights), the template and the
tokenizer, so a table is reused across epochs and runs; the batch carries its values
(`ref_logps_chosen`/`_rejected` [A, P], looked up by `pair_index`, by `add_ref_logps`).
`precompute_tables` runs the pass (or loads its cache). Above the step's reference
(dpojax.train.reference), as it needs the data pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dpojax import config as config_lib
from dpojax.data import batching, pipeline
from dpojax.train import logps as logps_lib
from dpojax.train import reference as reference_lib
from dpojax.train import sharding
from dpojax.train import step as step_lib

CACHE_VERSION = 1


def add_ref_logps(batch: dict, table: np.ndarray) -> dict:
  """The host batch plus `ref_logps_chosen` and `ref_logps_rejected` [A, P] (per-pair arrays
  like the rewards, so they shard and gather like them): table[pair_index], 0 for padding.

  `pair_index` [A, P] is the pair's index in its PreferenceData, -1 for padding.
  """
  if "pair_index" not in batch:
    raise KeyError("reference.mode=precomputed needs batches with 'pair_index' (the pair's "
                   "index in its data split, -1 for padding); this batch has "
                   f"{sorted(batch)}")
  index = np.asarray(batch["pair_index"])
  real = np.asarray(batch["pair_mask"]) > 0
  if np.any(real & (index < 0)) or np.any(index >= len(table)):
    raise ValueError(f"pair_index out of range for a table of {len(table)} pairs (was it "
                     "computed for another data split?)")
  values = np.where((index >= 0)[..., None], table[np.maximum(index, 0)], 0.0)
  out = dict(batch)
  out["ref_logps_chosen"] = values[..., 0].astype(np.float32)
  out["ref_logps_rejected"] = values[..., 1].astype(np.float32)
  return out


@jax.jit
def _fingerprint(tree):
  """Two wrapping 32-bit position-weighted checksums of each leaf's bits."""
  def leaf(x):
    width = {2: jnp.uint16, 4: jnp.uint32}.get(jnp.dtype(x.dtype).itemsize)
    if width is None:
      x, width = x.astype(jnp.float32), jnp.uint32
    bits = jax.lax.bitcast_convert_type(x, width).reshape(-1).astype(jnp.uint32)
    i = jnp.arange(bits.size, dtype=jnp.uint32)
    h1 = jnp.sum(bits * (i * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = bits ^ (bits >> 13)
    h2 = jnp.sum(mixed * (i * jnp.uint32(2246822519) + jnp.uint32(3266489917)),
                 dtype=jnp.uint32)
    return jnp.stack([h1, h2])
  return jax.tree.map(leaf, tree)


def params_fingerprint(params) -> str:
  """A digest of the weights' exact bits (computed where they live, gathered as scalars)."""
  sums = jax.device_get(_fingerprint(params))
  h = hashlib.sha256()
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(sums)):
    h.update(f"{jax.tree_util.keystr(path)}|{tuple(x.shape)}|{x.dtype}|".encode())
    h.update(np.asarray(s).tobytes())
  return h.hexdigest()


def _path_sha256(path: str) -> str:
  """sha256 of a file's bytes, or of a packed directory's files (names and bytes)."""
  h = hashlib.sha256()
  files = ([path] if not os.path.isdir(path) else
           [os.path.join(path, n) for n in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, n))])
  for name in files:
    h.update(os.path.basename(name).encode() + b"\0")
    with open(name, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def cache_key(data: pipeline.PreferenceData, step_cfg: step_lib.StepConfig,
              fingerprint: str) -> str:
  """What the reference log-probs of a split depend on: the data file's bytes, the options
  that turn it into tokens (template, BOS/EOS, length fitting), the tokenizer, the pairs
  kept (indices and lengths), the model architecture and weights, and the statistic."""
  opts = data.opts
  desc = {
      "version": CACHE_VERSION,
      "data_sha256": _path_sha256(data.path),
      "tokenizer_sha256": data.tok.sha256,
      "data_options": {k: getattr(opts, k) for k in (
          "format", "template", "add_bos", "append_eos", "truncation", "max_seq_length",
          "on_error", "boundary")},
      # Compute-only options (remat, attention tiles and kernel, scan unrolling) do not change
      # the values.
      "model": {k: v for k, v in dataclasses.asdict(dataclasses.replace(
          step_cfg.model, remat="none", attention_block=0)).items()
                if k not in ("attention_impl", "scan_unroll")},
      "params": fingerprint,
      "statistic": reference_lib.reference_key(step_cfg),
      "ld_alpha": step_cfg.loss.ld_alpha,
  }
  if opts.kl_chunk:  # KTO: the KL sequences' partners (older keys unchanged otherwise).
    desc["unpaired"] = {"kl_chunk": opts.kl_chunk, "unpair": opts.unpair}
  h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
  for arr in (data.indices, data.prompt_len, data.chosen_len, data.rejected_len):
    h.update(np.ascontiguousarray(arr, np.int64).tobytes())
  return h.hexdigest()


@functools.partial(jax.jit, static_argnames="cfg")
def reference_stats(params, batch, *, cfg):
  """[A, P, 2] reference statistics of a batch (forward only)."""
  def body(_, micro):
    stats = logps_lib.sequence_logps(params, micro, cfg, policy=False)
    return None, stats[reference_lib.reference_key(cfg)]
  return jax.lax.scan(body, None, batch)[1]


def compute_logps(step_cfg: step_lib.StepConfig, params, data: pipeline.PreferenceData, *,
                  pairs_per_batch: int, micro_batch_size: int, mesh=None) -> np.ndarray:
  """[len(data), 2] float32 reference statistics (chosen, rejected) of every pair: one
  forward pass in padded batches of `pairs_per_batch` pairs, in data order.

  `params` is the full reference (LoRA: the base). With a mesh, each process collates its
  block of every micro-batch (as the training pipeline does; micro_batch_size must be a
  multiple of the process count) and every process gets the whole table.
  """
  n = len(data)
  longest = int(max(data.chosen_len.max(), data.rejected_len.max())) if n else 1
  seq_len = -(-longest // 8) * 8
  pairs_per_batch = -(-pairs_per_batch // micro_batch_size) * micro_batch_size
  # This process's block of each micro-batch, as the training pipeline takes it.
  shard = batching.ProcessShard(pairs_per_batch, micro_batch_size,
                                jax.process_index() if mesh is not None else 0,
                                jax.process_count() if mesh is not None else 1, "pairs")
  table = np.zeros((n, 2), np.float32)
  for start in range(0, n, pairs_per_batch):
    idx = list(range(start, min(start + pairs_per_batch, n)))
    idx += [None] * (pairs_per_batch - len(idx))
    host = batching.collate([None if i is None else data[int(i)] for i in shard(idx)],
                            micro_batch_size=shard.local, seq_len=seq_len, opts=data.opts,
                            pair_offset=shard.offset)
    batch = host if mesh is None else sharding.global_batch(host, mesh)
    out = reference_stats(params, batch, cfg=step_cfg)  # [A, micro_batch_size, 2]
    if not out.is_fully_addressable:  # Multi-process: every process gets the whole table.
      out = multihost_utils.process_allgather(out, tiled=True)
    out = np.asarray(out).reshape(-1, 2)
    index = np.asarray([-1 if i is None else i for i in idx])
    table[index[index >= 0]] = out[index >= 0]
  return table


def _cache_paths(directory: str, key: str) -> tuple[str, str]:
  return os.path.join(directory, f"{key}.npy"), os.path.join(directory, f"{key}.json")


def load_cached(directory: str, key: str, num_pairs: int) -> np.ndarray | None:
  """The cached table, or None when absent or unusable (logged; it is then recomputed)."""
  path, _ = _cache_paths(directory, key)
  if not os.path.isfile(path):
    return None
  try:
    table = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    logging.warning("%s: unreadable reference log-prob cache (%s); recomputing", path, e)
    return None
  if table.shape != (num_pairs, 2) or table.dtype != np.float32 or not np.all(
      np.isfinite(table)):
    logging.warning("%s: cached reference log-probs have shape %s dtype %s (expected (%d, 2) "
                    "finite float32); recomputing", path, table.shape, table.dtype, num_pairs)
    return None
  return table


def save_cached(directory: str, key: str, table: np.ndarray, meta: dict):
  """Writes <key>.npy and <key>.json atomically (temporary names, then rename)."""
  os.makedirs(directory, exist_ok=True)
  path, meta_path = _cache_paths(directory, key)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, np.ascontiguousarray(table, np.float32), allow_pickle=False)
  os.replace(tmp, path)
  with open(f"{meta_path}.tmp-{os.getpid()}", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(f"{meta_path}.tmp-{os.getpid()}", meta_path)


def precompute_tables(step_cfg: step_lib.StepConfig, ref_cfg: config_lib.ReferenceConfig, params,
                      splits: dict, *, pairs_per_batch: int, micro_batch_size: int,
                      mesh=None) -> dict:
  """{split name: [num_pairs, 2] table} for `splits` ({name: PreferenceData}), each loaded
  from the cache or computed once and saved there (by process 0).

  Multi-process: process 0 decides hit or miss for everyone (its cache directory is the
  one that counts), so all processes run the same computations.
  """
  fingerprint = params_fingerprint(params)
  directory = ref_cfg.resolved_cache_dir
  multi = jax.process_count() > 1
  tables = {}
  for name, data in splits.items():
    key = cache_key(data, step_cfg, fingerprint)
    table = load_cached(directory, key, len(data)) if jax.process_index() == 0 else None
    if multi:
      hit = bool(multihost_utils.broadcast_one_to_all(np.int32(table is not None)))
      if hit:
        table = np.asarray(multihost_utils.broadcast_one_to_all(
            table if table is not None else np.zeros((len(data), 2), np.float32)))
      else:
        table = None
    if table is None:
      logging.info("Precomputing reference log-probs of %s (%d pairs)", data.path, len(data))
      table = compute_logps(step_cfg, params, data, pairs_per_batch=pairs_per_batch,
                            micro_batch_size=micro_batch_size, mesh=mesh)
      if jax.process_index() == 0:
        save_cached(directory, key, table, {
            "data": os.path.abspath(data.path), "pairs": len(data),
            "tokenizer": data.tok.path, "template": data.opts.template,
            "statistic": reference_lib.reference_key(step_cfg), "params_fingerprint": fingerprint})
    else:
      logging.info("Reference log-probs of %s from the cache %s", data.path,
                   _cache_paths(directory, key)[0])
    tables[name] = table
  return tables
