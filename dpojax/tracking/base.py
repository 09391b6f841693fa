"""The writer interface: what the training loop calls, whatever the destination."""

from __future__ import annotations


class Writer:
  """One destination of a run's metrics. Every method is optional but `write`.

  `local`: a file in the workdir (metrics.jsonl, TensorBoard); a refused write is handled by
  checkpoint.on_error. Otherwise a tracker (W&B, MLflow): any failure is one warning and the
  writer is dropped, so training never stops for it.
  `what`, `path`: how a failure names it ("metrics.jsonl", its file or folder).
  """

  local = True
  what = "writer"
  path = ""

  def write(self, step: int, split: str, metrics: dict):
    raise NotImplementedError

  def write_samples(self, step: int, samples: list[dict]):
    """Generations at an evaluation: dicts with prompt, policy and optional reference,
    chosen (see tracking.samples)."""

  def add_file(self, step: int, path: str):
    """A file of the run (curves.png, run_config.json, samples.jsonl) as an artifact."""

  def flush(self, step: int):
    """Before a checkpoint: what was written up to `step` is durable."""

  def close(self, step: int):
    """At the end of the run (or of a stopped one)."""


def scalars(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()}
