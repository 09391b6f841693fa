"""Metrics: writers (console, `<workdir>/metrics.jsonl`, TensorBoard event files), the
validation reduction, throughput and MFU."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from dpojax import loss as loss_lib
from dpojax.train import sharding

METRICS_FILE = "metrics.jsonl"
# Wall-clock figures: they differ between otherwise identical runs.
TIMING_METRICS = ("step_time", "pairs_per_s", "tokens_per_s", "model_flops_per_s", "mfu")
# The console line keeps to these; metrics.jsonl and TensorBoard get everything.
CONSOLE_METRICS = ("loss", "accuracy", "rewards_margin_mean", "rewards_chosen_mean",
                   "rewards_rejected_mean", "grad_norm", "learning_rate", "pairs_per_s",
                   "tokens_per_s", "mfu", "nonfinite_steps",
                   "nll_loss", "log_odds_ratio", "kl")  # CPO/ORPO/KTO (dpojax.methods).


def truncate_after(path: str, step: int):
  """Drops records past `step` (written after the checkpoint a resumed run starts from)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class MetricWriter:
  """Writes from process 0 only; other processes get a writer that drops everything."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    truncate_after(self.path, resume_step)
    self._jsonl = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
    self._tb.flush()
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()
                     if k in CONSOLE_METRICS)
    tqdm.tqdm.write(f"[{split}] step {step}: {shown}", file=sys.stdout)
    sys.stdout.flush()

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()


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
  """Pairs/s, tokens/s and model FLOP utilisation over a logging interval.

  FLOPs per token are `flops_per_token` (see the function of that name).
  """

  def __init__(self, flops_per_token: float, peak_flops: float):
    self.flops_per_token, self.peak = flops_per_token, peak_flops
    self.reset()

  def reset(self):
    self.pairs = self.tokens = 0
    self.start = time.perf_counter()

  def add(self, pairs: int, tokens: int):
    self.pairs += pairs
    self.tokens += tokens

  def report(self) -> dict:
    dt = max(time.perf_counter() - self.start, 1e-9)
    out = {"pairs_per_s": self.pairs / dt, "tokens_per_s": self.tokens / dt,
           "model_flops_per_s": self.flops_per_token * self.tokens / dt}
    if self.peak > 0:
      out["mfu"] = out["model_flops_per_s"] / self.peak
    self.reset()
    return out


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar (ETA, steps/s) on terminals; nothing in logs that are files."""
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   disable=not (enabled and sys.stdout.isatty()), leave=False)
