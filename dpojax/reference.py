"""The reference policy: how it is held, precomputed, cached and synced.

`reference.mode` (the `reference` config section):
  copy         an immutable copy of the initial policy (a second set of weights).
  lora_base    LoRA only: the base with the adapters off; no second copy of the weights.
  precomputed  one forward pass over the train and validation data before training gives
               each pair's reference log-prob sums; they are cached on disk under a key of
               the data, the model (a fingerprint of the weights), the template and the
               tokenizer, reused across epochs and runs, and the batch carries them
               (`ref_logps_chosen`/`_rejected` [A, P], looked up by `pair_index`); no
               reference weights are
               kept during training and the step skips the reference forward.
  none         reference-free (log-probs 0; same as dpo.reference_free=True).
  auto         lora_base with LoRA, none with dpo.reference_free, else copy.
TR-DPO (`reference.sync_steps` > 0, copy only): every sync_steps optimizer steps,
  ref <- alpha * policy + (1 - alpha) * ref  (alpha = reference.sync_alpha; TRL's
  SyncRefModelCallback). The reference then lives in `TrainState.ref`, so it is
  checkpointed and resumes exactly.

`split` turns the initial params into (trained tree, frozen tree, state reference) for each
mode; `precompute_tables` runs the precompute pass (or loads its cache); `add_ref_logps`
adds the cached values to a host batch; `sync_state` is the pure TR-DPO update.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dpojax.data import pipeline
from dpojax.model import lora as lora_lib
from dpojax.train import sharding
from dpojax.train import step as step_lib
from dpojax.errors import ConfigError

MODES = ("auto",) + step_lib.REFERENCE_MODES
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  mode: str = "copy"  # Resolved: never "auto".
  sync_steps: int = 0
  sync_alpha: float = 0.6
  cache_dir: str = ""

  @property
  def resolved_cache_dir(self) -> str:
    return self.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dpojax",
                                          "reference")

  @classmethod
  def from_config(cls, config) -> ReferenceConfig:
    """From the run config's `reference` section (with `lora.enabled` and
    `dpo.reference_free`, which `auto` and the checks need)."""
    d = dict(config.get("reference", {}))
    unknown = sorted(set(d) - {"mode", "sync_steps", "sync_alpha", "cache_dir"})
    if unknown:
      raise ConfigError(f"unknown config keys: {['reference.' + k for k in unknown]}")
    lora_on = bool(config.get("lora", {}).get("enabled", False))
    reference_free = bool(config.get("dpo", {}).get("reference_free", False))
    mode = d.get("mode", "auto")
    if mode not in MODES:
      raise ConfigError(f"reference.mode={mode!r} is not one of {MODES}")
    if mode == "auto":
      mode = "none" if reference_free else "lora_base" if lora_on else "copy"
    if reference_free and mode != "none":
      raise ConfigError(f"dpo.reference_free=True contradicts reference.mode={mode!r}")
    if mode == "lora_base" and not lora_on:
      raise ConfigError("reference.mode=lora_base needs lora.enabled=True")
    sync_steps, alpha = d.get("sync_steps", 0), d.get("sync_alpha", 0.6)
    if isinstance(sync_steps, bool) or not isinstance(sync_steps, int) or sync_steps < 0:
      raise ConfigError(f"reference.sync_steps={sync_steps!r} must be an integer >= 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
      raise ConfigError(f"reference.sync_alpha={alpha!r} must be in (0, 1]")
    if sync_steps and mode != "copy":
      raise ConfigError(f"reference.sync_steps={sync_steps} (TR-DPO) needs reference.mode="
                        f"copy, not {mode!r}: the reference must be its own weights")
    cache_dir = d.get("cache_dir", "")
    if not isinstance(cache_dir, str):
      raise ConfigError(f"reference.cache_dir={cache_dir!r} must be a path")
    return cls(mode=mode, sync_steps=sync_steps, sync_alpha=float(alpha), cache_dir=cache_dir)


def step_config(config, step_cfg: step_lib.StepConfig) -> step_lib.StepConfig:
  """`step_cfg` with the run config's LoRA and reference settings."""
  ref_cfg = ReferenceConfig.from_config(config)
  return dataclasses.replace(step_cfg, lora=lora_lib.LoraConfig.from_config(config.lora),
                             reference=ref_cfg.mode, seed=int(config.train.seed))


# --- the trained and frozen trees ---------------------------------------------------------
class Parts(NamedTuple):
  trainable: Any  # -> TrainState.params (the optimizer's and checkpoint's tree).
  frozen: Any  # -> the step's second argument.
  state_ref: Any  # -> TrainState.ref (TR-DPO), else None.


def _copy(tree):
  """New buffers with the same shardings (the train state is donated; the copy must not be)."""
  copy = lambda t: jax.tree.map(jnp.copy, t)
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):  # Host arrays.
    return jax.jit(copy)(tree)
  return jax.jit(copy, out_shardings=jax.tree.map(lambda x: x.sharding, tree))(tree)


def split(step_cfg: step_lib.StepConfig, params, *, sync: bool = False, rng=None,
          mesh=None) -> Parts:
  """The initial policy `params` -> (trained, frozen, state reference) for the step's mode.

  LoRA: adapters from `rng` (default: fold_in(key(step_cfg.seed), 1), apart from the model
  init's key(seed); replicated on `mesh`), the base is `params` itself (the same buffers:
  nothing is copied unless the mode is copy). Copies keep the shardings of `params`.
  """
  rng = jax.random.fold_in(jax.random.key(step_cfg.seed), 1) if rng is None else rng
  adapters = None
  if step_cfg.lora is not None:
    init = functools.partial(lora_lib.init, step_cfg.model, step_cfg.lora)
    if mesh is not None:
      abstract = jax.eval_shape(init, rng)
      init = jax.jit(init, out_shardings=sharding.tree_shardings(abstract, mesh))
    adapters = init(rng)
  return _assemble(step_cfg, params, adapters, sync, _copy)


def abstract_split(step_cfg: step_lib.StepConfig, abstract_params, *,
                   sync: bool = False) -> Parts:
  """`split` on shapes only (jax.ShapeDtypeStruct trees), for compiling before any weights
  exist."""
  adapters = None
  if step_cfg.lora is not None:
    adapters = jax.eval_shape(functools.partial(lora_lib.init, step_cfg.model, step_cfg.lora),
                              jax.random.key(0))
  return _assemble(step_cfg, abstract_params, adapters, sync, lambda t: t)


def _assemble(step_cfg, params, adapters, sync, copy) -> Parts:
  mode = step_cfg.reference
  if sync and mode != "copy":
    raise ConfigError(f"reference.sync_steps needs reference.mode=copy, not {mode!r}")
  state_ref = copy(params) if sync else None
  if step_cfg.lora is None:
    frozen = copy(params) if mode == "copy" and not sync else {}
    return Parts(params, frozen, state_ref)
  frozen = {"base": params}
  if mode == "copy" and not sync:
    frozen["reference"] = copy(params)
  return Parts(adapters, frozen, state_ref)


def policy_params(step_cfg: step_lib.StepConfig, trainable, frozen):
  """The policy as a plain params tree (LoRA: adapters merged into the base), e.g. to export."""
  if step_cfg.lora is None:
    return trainable
  return lora_lib.merge(frozen["base"], trainable, step_cfg.model, step_cfg.lora)


# --- TR-DPO --------------------------------------------------------------------------------
def sync(ref, policy, alpha: float):
  """ref <- alpha * policy + (1 - alpha) * ref, per leaf in float32, in ref's dtype."""
  def mix(r, p):
    return (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)).astype(
        r.dtype)
  return jax.tree.map(mix, ref, policy)


def sync_state(state: step_lib.TrainState, frozen, *, cfg: step_lib.StepConfig,
               alpha: float) -> step_lib.TrainState:
  """The TR-DPO update of `state.ref` from the current policy (pure; jit with the state
  donated). The loop calls it after every `reference.sync_steps`-th optimizer step."""
  return state.replace(ref=sync(state.ref, policy_params(cfg, state.params, frozen), alpha))


# --- precomputed reference log-probs -------------------------------------------------------
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
      "statistic": step_lib.reference_key(step_cfg),
      "ld_alpha": step_cfg.loss.ld_alpha,
  }
  h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
  for arr in (data.indices, data.prompt_len, data.chosen_len, data.rejected_len):
    h.update(np.ascontiguousarray(arr, np.int64).tobytes())
  return h.hexdigest()


@functools.partial(jax.jit, static_argnames="cfg")
def reference_stats(params, batch, *, cfg):
  """[A, P, 2] reference statistics of a batch (forward only)."""
  def body(_, micro):
    stats = step_lib.sequence_logps(params, micro, cfg, policy=False)
    return None, stats[step_lib.reference_key(cfg)]
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
  shard = pipeline.ProcessShard(pairs_per_batch, micro_batch_size,
                                jax.process_index() if mesh is not None else 0,
                                jax.process_count() if mesh is not None else 1, "pairs")
  table = np.zeros((n, 2), np.float32)
  for start in range(0, n, pairs_per_batch):
    idx = list(range(start, min(start + pairs_per_batch, n)))
    idx += [None] * (pairs_per_batch - len(idx))
    host = pipeline.collate([None if i is None else data[int(i)] for i in shard(idx)],
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


def precompute_tables(step_cfg: step_lib.StepConfig, ref_cfg: ReferenceConfig, params,
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
            "statistic": step_lib.reference_key(step_cfg), "params_fingerprint": fingerprint})
    else:
      logging.info("Reference log-probs of %s from the cache %s", data.path,
                   _cache_paths(directory, key)[0])
    tables[name] = table
  return tables
