"""The writers of a run, as the loop holds them: one list, one place for every failure.

  logging.writers = ("jsonl", "tensorboard")   # + "wandb", "mlflow"

The console line is always written. Only process 0 writes; the other processes hold an empty
list. A local writer's refused write (disk full) follows checkpoint.on_error (policy.refused);
any failure of a tracker (W&B, MLflow) is one warning and the tracker is dropped: training
never stops for it. Anything else a local writer raises is a bug and propagates.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

from dpojax import plot  # Loads matplotlib only when it draws.
from dpojax.errors import ConfigError
from dpojax.tracking import policy
from dpojax.tracking.base import Writer
from dpojax.tracking.console import ConsoleWriter
from dpojax.tracking.jsonl import SAMPLES_FILE, JsonlWriter, SamplesWriter
from dpojax.tracking.tensorboard import TensorBoardWriter

DEFAULT_WRITERS = ("jsonl", "tensorboard")
# Trackers: (package, pip extra).
TRACKERS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
WRITERS = DEFAULT_WRITERS + tuple(TRACKERS)
WANDB_MODES = ("online", "offline", "disabled")
STATE_DIR = "tracking"  # <workdir>/tracking/<tracker>.json: run ids kept for a resume.


def writer_names(config) -> tuple[str, ...]:
  logging_cfg = config.get("logging") or {}
  names = logging_cfg.get("writers", DEFAULT_WRITERS)
  return (names,) if isinstance(names, str) else tuple(names)


def check_available(config):
  """At start-up, before anything is compiled: every writer is known and its package is
  installed (one ConfigError line naming logging.writers otherwise)."""
  names = writer_names(config)
  for name in names:
    if name not in WRITERS:
      raise ConfigError(f"logging.writers: {name!r} is not one of {WRITERS}")
    if name in TRACKERS:
      package, extra = TRACKERS[name]
      try:
        found = importlib.util.find_spec(package) is not None
      except (ImportError, ValueError):
        found = False
      if not found:
        raise ConfigError(f"logging.writers includes {name!r} but the {package} package is "
                          f"not installed: pip install -e '.[{extra}]'")
  wandb_mode = (config.get("logging") or {}).get("wandb", {}).get("mode", "online")
  if "wandb" in names and wandb_mode not in WANDB_MODES:
    raise ConfigError(f"logging.wandb.mode={wandb_mode!r} is not one of {WANDB_MODES}")


class Writers:
  """The loop's writers. Every call goes to each writer through `_call`."""

  def __init__(self, *, on_error: str, checkpoints: str, say):
    self.writers: list[Writer] = []
    self.on_error, self.checkpoints, self.say = on_error, checkpoints, say
    self._refused = set()  # Warnings already given (checkpoint.on_error=continue).

  def add(self, step: int, what: str, where: str, local: bool, factory):
    """Opens a writer (`factory()`), its failure handled as a write's."""
    stub = Writer()
    stub.what, stub.path, stub.local = what, where, local
    self._call(stub, step, lambda: self.writers.append(factory()))

  def write(self, step: int, split: str, metrics: dict):
    for w in list(self.writers):
      self._call(w, step, lambda w=w: w.write(step, split, metrics))

  def write_samples(self, step: int, samples: list[dict]):
    for w in list(self.writers):
      self._call(w, step, lambda w=w: w.write_samples(step, samples))

  def add_file(self, step: int, path: str):
    for w in list(self.writers):
      self._call(w, step, lambda w=w: w.add_file(step, path))

  def flush(self, step: int):
    for w in list(self.writers):
      self._call(w, step, lambda w=w: w.flush(step))

  def close(self, step: int):
    for w in list(self.writers):
      self._call(w, step, lambda w=w: w.close(step))
    self.writers = []

  def attempt(self, step: int, what: str, where: str, fn, partial: str | None = None):
    """A write of the run outside the writers (run_config.json, curves.png) under the same
    policy; `partial` is removed if the write fails. Returns fn's value, or None."""
    out = []
    stub = Writer()
    stub.what, stub.path = what, where

    def run():
      try:
        out.append(fn())
      except Exception:
        if partial and os.path.exists(partial):
          os.remove(partial)
        raise

    self._call(stub, step, run)
    return out[0] if out else None

  def _call(self, writer: Writer, step: int, fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if not writer.local:  # A tracker never stops training.
        if writer in self.writers:
          self.writers.remove(writer)
        self.say(f"WARNING: {writer.what} failed at step {step} ({type(e).__name__}: {e}); "
                 "the run goes on without it")
        return
      reason = policy.storage_reason(e)
      if reason is None:
        raise
      policy.refused(writer.what, step, writer.path, reason, self.checkpoints,
                     self.on_error, self._say_once)

  def _say_once(self, line: str):
    """One warning per writer, step and reason: a step writes a writer more than once (its
    train and val records, samples, files), and on a full disk each write fails alike."""
    if line not in self._refused:
      self._refused.add(line)
      self.say(line)


def open_writers(writers: Writers, config, workdir: str, *, resume_step: int, lead: bool,
                 run_config_path: str):
  """Adds the writers named by logging.writers to `writers` (process 0 only).

  resume_step: records after it are dropped or skipped (a resumed run redoes them); -1 for
  a fresh run. The trackers take the resolved config from `run_config_path`.
  """
  if not lead:
    return
  writers.writers.append(ConsoleWriter())
  run_config = run_config_dict(config, run_config_path)
  step = max(resume_step, 0)
  logging_cfg = config.get("logging") or {}
  state_dir = os.path.join(workdir, STATE_DIR)
  for name in writer_names(config):
    if name == "jsonl":
      writers.add(step, "metrics.jsonl", os.path.join(workdir, "metrics.jsonl"), True,
                  lambda: JsonlWriter(workdir, resume_step))
      writers.add(step, SAMPLES_FILE, os.path.join(workdir, SAMPLES_FILE), True,
                  lambda: SamplesWriter(workdir, resume_step))
    elif name == "tensorboard":
      writers.add(step, "TensorBoard events", os.path.join(workdir, "tensorboard"), True,
                  lambda: TensorBoardWriter(workdir))
    elif name == "wandb":
      writers.add(step, "W&B", "wandb", False, lambda: _tracker("wandb_run").WandbWriter(
          workdir, state_dir, logging_cfg.get("wandb", {}), run_config, resume_step))
    elif name == "mlflow":
      writers.add(step, "MLflow", "mlflow", False, lambda: _tracker("mlflow_run").MlflowWriter(
          workdir, state_dir, logging_cfg.get("mlflow", {}), run_config, resume_step))


def finish_run(writers: Writers, workdir: str, step: int, run_config_path: str):
  """At the end (process 0): curves.png, under the write policy, then curves.png,
  run_config.json and samples.jsonl to every writer as files of the run."""
  curves = os.path.join(workdir, plot.CURVES_FILE)
  try:
    if os.path.exists(os.path.join(workdir, plot.METRICS_FILE)) and writers.attempt(
        step, plot.CURVES_FILE, curves, lambda: plot.plot_metrics(workdir),
        partial=curves + ".tmp.png"):
      writers.say(f"Wrote {curves}")
  except ValueError as e:  # Nothing to draw.
    writers.say(f"WARNING: training curves not drawn ({e})")
  for path in (curves, run_config_path, os.path.join(workdir, SAMPLES_FILE)):
    if os.path.exists(path):
      writers.add_file(step, path)


def run_config_dict(config, path: str) -> dict:
  """The resolved run config (run_config.json), else the config as given."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return json.loads(config.to_json_best_effort())


def _tracker(module: str):
  """The tracker's module, imported only when asked for (its package is an extra)."""
  return importlib.import_module(f"dpojax.tracking.{module}")
