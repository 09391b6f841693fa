"""Metric writers: console, `<workdir>/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


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
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
    print(f"[{split}] step {step}: {shown}", flush=True)

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()
