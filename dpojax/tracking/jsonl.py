"""<workdir>/metrics.jsonl: one JSON record per line, {"step", "split", metric: value};
<workdir>/samples.jsonl: one line per sample generated at an evaluation (tracking.samples).

Each record is appended whole or not at all (policy.append), so a full disk never leaves a
broken line for the resume, `plot` or a reader to trip on.
"""

from __future__ import annotations

import json
import os

from dpojax.tracking import policy
from dpojax.tracking.base import Writer, scalars

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def truncate_after(path: str, step: int):
  """Drops records past `step` (written after the checkpoint a resumed run starts from)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  except OSError:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_records(workdir: str, name: str = METRICS_FILE) -> list[dict]:
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(l) for l in f if l.strip()]


class JsonlWriter(Writer):
  """metrics.jsonl."""

  what = METRICS_FILE

  def __init__(self, workdir: str, resume_step: int, name: str = METRICS_FILE):
    os.makedirs(workdir, exist_ok=True)
    self.what = name
    self.path = os.path.join(workdir, name)
    truncate_after(self.path, resume_step)
    self._fd = None

  def _append(self, lines: str):
    if self._fd is None:
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    policy.append(self._fd, lines.encode())

  def write(self, step, split, metrics):
    self._append(json.dumps({"step": int(step), "split": split, **scalars(metrics)}) + "\n")

  def close(self, step):
    if self._fd is not None:
      os.close(self._fd)


class SamplesWriter(JsonlWriter):
  """samples.jsonl: one line per sample, {"step", "prompt", "policy", ...}."""

  def __init__(self, workdir: str, resume_step: int):
    super().__init__(workdir, resume_step, SAMPLES_FILE)

  def write(self, step, split, metrics):
    pass

  def write_samples(self, step, samples):
    self._append("".join(json.dumps(dict(s, step=int(step))) + "\n" for s in samples))
