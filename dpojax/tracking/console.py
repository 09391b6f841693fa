"""The console line of each record (a few headline metrics), above tqdm's bar."""

from __future__ import annotations

import sys

import tqdm

from dpojax.tracking.base import Writer

# The console line keeps to these; metrics.jsonl and TensorBoard get everything.
CONSOLE_METRICS = ("loss", "accuracy", "rewards_margin_mean", "rewards_chosen_mean",
                   "rewards_rejected_mean", "grad_norm", "learning_rate", "pairs_per_s",
                   "tokens_per_s", "mfu", "nonfinite_steps",
                   "nll_loss", "log_odds_ratio", "kl")  # CPO/ORPO/KTO (dpojax.methods).


class ConsoleWriter(Writer):
  what = "console"

  def write(self, step, split, metrics):
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()
                     if k in CONSOLE_METRICS)
    tqdm.tqdm.write(f"[{split}] step {step}: {shown}", file=sys.stdout)
    sys.stdout.flush()
