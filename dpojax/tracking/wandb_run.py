"""Weights & Biases: logging.wandb.{project, entity, name, group, tags, mode}.

One W&B step per training step: a step's train and val metrics (and its samples table) are
one row, committed when a later step arrives or before a checkpoint (`flush`). mode=offline
writes <workdir>/wandb/offline-run-*/ without network (`wandb sync` uploads it later). The
resolved run config is the run's config. The writers' list runs it on process 0 only; any
failure is one warning and the run goes on without it.

Resume: the run id is kept in <workdir>/tracking/wandb.json, so a resumed run continues the
same W&B run. W&B keeps what it was sent only once the run finishes (a `kill -9` loses what
its service had not written), so the file also holds the last step of a run that finished;
a resumed run first replays metrics.jsonl and samples.jsonl from there up to its checkpoint,
then logs on. W&B keeps the first row of a step and ignores a step below the run's current
one (its rule for resumed runs), so the history has every step once, whatever was lost.
"""

from __future__ import annotations

import os
import secrets

import wandb

from dpojax.tracking import jsonl
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
    self.durable = int(state.get("finished_step", -1))  # Kept by a finished W&B run.
    self.committed = -1
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
    if resume_step > self.durable:
      self._replay(workdir, resume_step)

  def _save_state(self):
    state_lib.save(self.state_dir, NAME, {"run_id": self.run_id,
                                          "finished_step": self.durable})

  def _replay(self, workdir: str, resume_step: int):
    """The records W&B may have lost (after its last finished step, up to the checkpoint)."""
    wanted = lambda r: self.durable < r["step"] <= resume_step
    try:
      records = [r for r in jsonl.read_records(workdir) if wanted(r)]
    except OSError:  # No metrics.jsonl (logging.writers without "jsonl"): nothing to replay.
      return
    try:
      samples = [s for s in jsonl.read_records(workdir, jsonl.SAMPLES_FILE) if wanted(s)]
    except OSError:
      samples = []
    for r in records:
      self.write(r["step"], r["split"], {k: v for k, v in r.items()
                                         if k not in ("step", "split")})
      if r["split"] == "val":
        if batch := [s for s in samples if s["step"] == r["step"]]:
          self.write_samples(r["step"], batch)
    self._commit()

  def _add(self, step: int, values: dict):
    if step <= self.committed:  # Sent already (W&B would ignore it).
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
    self.durable = max(self.durable, self.committed)
    self._save_state()
