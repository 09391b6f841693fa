"""Metrics: the validation reduction, throughput and MFU (the writers are dpojax.tracking)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from dpojax import loss as loss_lib
from dpojax.train import sharding

# Wall-clock and memory figures: they differ between otherwise identical runs.
TIMING_METRICS = ("step_time", "pairs_per_s", "tokens_per_s", "model_flops_per_s", "mfu",
                  "data_time", "compute_time", "checkpoint_time", "eval_time", "sample_time",
                  "peak_device_memory_gb", "peak_host_rss_gb")


def evaluate(eval_fn, params, ref_params, batches, mesh) -> dict:
  """Metric means over `batches`: the eval step's sums, added up, then finalized."""
  total = None
  for batch in batches:
    sums = eval_fn(params, ref_params, sharding.global_batch(batch, mesh))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return loss_lib.finalize_metrics(jax.device_get(total))


def describe_pairs(host_batch, data) -> str:
  """Where the real pairs of a batch come from (file and source lines), for the non-finite
  log line."""
  index = np.asarray(host_batch["pair_index"]).reshape(-1)
  mask = np.asarray(host_batch["pair_mask"]).reshape(index.shape) > 0
  lines = sorted(data.line(int(i)) for i in index[mask & (index >= 0)])
  return f"{data.source_path}, lines {','.join(map(str, lines))}" if lines else "none"


def flops_per_token(n_params: int, *, reference: str = "copy", lora: bool = False) -> float:
  """Model FLOPs per trained token (the 6N rule): 2N for the policy forward, 4N for its
  backward (2N with LoRA: no weight gradients of the frozen base), 2N for a reference forward
  (none when it is precomputed or absent)."""
  policy = (4 if lora else 6) * n_params
  return float(policy + (2 * n_params if reference in ("copy", "lora_base") else 0))


class Throughput:
  """Pairs/s, tokens/s and model FLOP utilisation over a logging interval's step time
  (data wait + compute: tracking.timing), never its evaluations or checkpoints.

  FLOPs per token are `flops_per_token` (see the function of that name). MFU divides by
  `peak_flops` (none if <= 0), raised to any faster interval's FLOP/s: never above 1.
  """

  def __init__(self, flops_per_token: float, peak_flops: float):
    self.flops_per_token, self.peak = flops_per_token, peak_flops
    self.reset()

  def reset(self):
    self.pairs = self.tokens = 0

  def add(self, pairs: int, tokens: int):
    self.pairs += pairs
    self.tokens += tokens

  def report(self, seconds: float) -> dict:
    dt = max(seconds, 1e-9)
    out = {"pairs_per_s": self.pairs / dt, "tokens_per_s": self.tokens / dt,
           "model_flops_per_s": self.flops_per_token * self.tokens / dt}
    if self.peak > 0:
      self.peak = max(self.peak, out["model_flops_per_s"])
      out["mfu"] = out["model_flops_per_s"] / self.peak
    self.reset()
    return out


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar (ETA, steps/s) on terminals; nothing in logs that are files."""
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   disable=not (enabled and sys.stdout.isatty()), leave=False)
