"""Weights & Biases: logging.wandb.{project, entity, name, group, tags, mode}.

One W&B step per training step: a step's train and val metrics (and its samples table) are
one row, committed when a later step arrives or before a checkpoint (`flush`), so what a
checkpoint covers is in W&B before it is saved. The run id and the last committed step are
kept in <workdir>/tracking/wandb.json: a resumed run continues the same W&B run and skips the
steps W&B already holds (the steps a resume redoes are bitwise the same), so none is missing
or logged twice. mode=offline writes <workdir>/wandb/offline-run-*/ without network
(`wandb sync` uploads it later). The resolved run config is the run's config. The writers'
list runs it on process 0 only; any failure is one warning and the run goes on without it.
"""

from __future__ import annotations

import os
import secrets

import wandb

from dpojax.tracking import state as state_lib
from dpojax.tracking.base import Writer, scalars

NAME = "wandb"
SAMPLE_COLUMNS = ("prompt", "policy", "reference", "chosen")


class WandbWriter(Writer):
  local = False
  what = "W&B"

  def __init__(self, workdir: str, state_dir: str, cfg, run_config: dict, resume_step: int):
    self.state_dir = state_dir
    state = state_lib.load(state_dir, NAME) if resume_step >= 0 else {}
    self.run_id = state.get("run_id") or secrets.token_hex(4)  # W&B's own ids: 8 of [a-z0-9].
    self.committed = int(state.get("step", -1))
    self.path = os.path.join(workdir, "wandb")
    self.run = wandb.init(
        project=cfg.get("project") or "dpojax", entity=cfg.get("entity") or None,
        name=cfg.get("name") or os.path.basename(os.path.abspath(workdir)),
        group=cfg.get("group") or None, tags=list(cfg.get("tags") or ()) or None,
        mode=cfg.get("mode") or "online", dir=workdir, id=self.run_id, resume="allow",
        settings=wandb.Settings(console="off", silent=True))
    self.run.config.update(run_config, allow_val_change=True)
    self._save_state()
    self.pending_step, self.pending = None, {}

  def _save_state(self):
    state_lib.save(self.state_dir, NAME, {"run_id": self.run_id, "step": self.committed})

  def _add(self, step: int, values: dict):
    if step <= self.committed:  # W&B holds this step already (a resume redoes it).
      return
    if self.pending_step is not None and step != self.pending_step:
      self._commit()
    self.pending_step = step
    self.pending.update(values)

  def _commit(self):
    if self.pending_step is None:
      return
    self.run.log(self.pending, step=self.pending_step, commit=True)
    self.committed, self.pending_step, self.pending = self.pending_step, None, {}
    self._save_state()

  def write(self, step, split, metrics):
    self._add(step, {f"{split}/{k}": v for k, v in scalars(metrics).items()})

  def write_samples(self, step, samples):
    columns = [c for c in SAMPLE_COLUMNS if samples and c in samples[0]]
    table = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
    self._add(step, {"samples": table})

  def flush(self, step):
    self._commit()

  def close(self, step):
    self._commit()
    self.run.finish()
