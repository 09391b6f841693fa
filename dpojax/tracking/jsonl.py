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
  what = METRICS_FILE

  def __init__(self, workdir: str, resume_step: int):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    self.samples_path = os.path.join(workdir, SAMPLES_FILE)
    for path in (self.path, self.samples_path):
      truncate_after(path, resume_step)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._samples_fd = None

  def write(self, step, split, metrics):
    record = {"step": int(step), "split": split, **scalars(metrics)}
    policy.append(self._fd, (json.dumps(record) + "\n").encode())

  def write_samples(self, step, samples):
    if self._samples_fd is None:
      self._samples_fd = os.open(self.samples_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                 0o644)
    lines = "".join(json.dumps(dict(s, step=int(step))) + "\n" for s in samples)
    policy.append(self._samples_fd, lines.encode())

  def close(self, step):
    for fd in (self._fd, self._samples_fd):
      if fd is not None:
        os.close(fd)
