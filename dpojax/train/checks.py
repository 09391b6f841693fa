"""Checks a training run makes before anything heavy: config values and a writable workdir.

Each message names the key (or flag) and the rule it breaks.
"""

from __future__ import annotations

import os
import tempfile

from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax.errors import ConfigError
from dpojax.ops import logprob as logprob_lib

CHECKPOINT_ON_ERROR = ("stop", "continue")


def check_config(config):
  t = config.train
  if t.global_batch_size <= 0 or t.micro_batch_size <= 0:
    raise ConfigError("train.global_batch_size and train.micro_batch_size must be positive")
  if t.global_batch_size % t.micro_batch_size:
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                      f"train.micro_batch_size={t.micro_batch_size}")
  if t.max_steps <= 0:
    raise ConfigError(f"train.max_steps={t.max_steps} must be positive")
  for key in ("eval.interval", "checkpoint.interval", "train.log_interval"):
    section, name = key.split(".")
    if config[section][name] <= 0:
      raise ConfigError(f"{key}={config[section][name]} must be positive")
  if config.eval.get("interval_epochs", 0.0) < 0:
    raise ConfigError(f"eval.interval_epochs={config.eval.interval_epochs} must be >= 0")
  for key, ok, rule in (
      ("train.learning_rate", lambda v: v > 0, "must be positive"),
      ("train.warmup_steps", lambda v: v >= 0, "must be >= 0"),
      ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
      ("train.weight_decay", lambda v: v >= 0, "must be >= 0"),
      ("train.adam_b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("train.adam_b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("train.adam_eps", lambda v: v > 0, "must be positive"),
      ("train.grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables it)"),
      ("train.max_consecutive_nonfinite", lambda v: v >= 1, "must be at least 1"),
      ("checkpoint.max_to_keep", lambda v: v >= 1, "must be at least 1")):
    section, name = key.split(".")
    value = config[section][name]
    if not ok(value):  # NaN fails every rule.
      raise ConfigError(f"{key}={value} {rule}")
  if config.checkpoint.on_error not in CHECKPOINT_ON_ERROR:
    raise ConfigError(f"checkpoint.on_error={config.checkpoint.on_error!r} is not one of "
                      f"{CHECKPOINT_ON_ERROR}")
  model_lib.ModelConfig.from_dict(config.model)  # Names the model.* key (dtypes, shapes).
  loss_lib.LossConfig.from_config(config.dpo)  # Checks every dpo.* key; names the key.
  logprob_lib.resolve_impl(config.logprob.impl)  # Names logprob.impl if it is unknown.


def check_workdir(workdir: str):
  """Fails before any compilation if the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # A probe of this process's own: the processes of a run share the workdir, and one
    # removing a common probe under another's feet would fail that one.
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror})") from None

