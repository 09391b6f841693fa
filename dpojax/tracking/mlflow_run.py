"""MLflow: logging.mlflow.{tracking_uri, experiment, run_name}.

The default URI is a local store in the workdir: <workdir>/mlflow.db (SQLite; MLflow 3 keeps
its plain file store for old runs only) with the artifacts in <workdir>/mlartifacts
(`mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db` shows it). The flattened resolved config is the run's params; every metric
is logged with its step as `split/name`; each evaluation's samples are an artifact
(samples/step_N.json), and at the end curves.png, run_config.json and samples.jsonl. The run
id is kept in <workdir>/tracking/mlflow.json: a resumed run continues the same MLflow run
and skips the steps its store holds already (each log_batch is one transaction), so none is
missing or logged twice.
Process 0 only; any failure is one warning and the run goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

import mlflow
from mlflow.entities import Metric, Param, RunStatus

from dpojax.tracking import state as state_lib
from dpojax.tracking.base import Writer, scalars

# MLflow logs its store's set-up (database migrations) at INFO: not the run's news.
logging.getLogger("mlflow").setLevel(logging.WARNING)

NAME = "mlflow"
MAX_PARAM = 6000  # MLflow's limit on a param's value.


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
  return out


class MlflowWriter(Writer):
  local = False
  what = "MLflow"

  def __init__(self, workdir: str, state_dir: str, cfg, run_config: dict, resume_step: int):
    self.state_dir = state_dir
    root = os.path.abspath(workdir)
    uri = cfg.get("tracking_uri") or f"sqlite:///{os.path.join(root, 'mlflow.db')}"
    self.path = uri
    self.client = mlflow.MlflowClient(tracking_uri=uri)
    state = state_lib.load(state_dir, NAME) if resume_step >= 0 else {}
    self.logged = {}  # split -> the last step the store holds.
    self.run_id = state.get("run_id")
    if self.run_id:
      self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
      for split in ("train", "val"):  # Every record has a loss.
        history = self.client.get_metric_history(self.run_id, f"{split}/loss")
        self.logged[split] = max((m.step for m in history), default=-1)
    else:
      name = cfg.get("experiment") or "dpojax"
      experiment = self.client.get_experiment_by_name(name)
      experiment_id = (experiment.experiment_id if experiment is not None
                       else self.client.create_experiment(name, artifact_location=(
                           None if cfg.get("tracking_uri") else
                           pathlib.Path(os.path.join(root, "mlartifacts")).as_uri())))
      run = self.client.create_run(
          experiment_id, run_name=cfg.get("run_name") or os.path.basename(
              os.path.abspath(workdir)))
      self.run_id = run.info.run_id
      params = [Param(k, v[:MAX_PARAM]) for k, v in flatten(run_config).items()]
      for i in range(0, len(params), 100):  # MLflow takes 100 params per batch.
        self.client.log_batch(self.run_id, params=params[i:i + 100])
    self._save_state()

  def _save_state(self):
    state_lib.save(self.state_dir, NAME, {"run_id": self.run_id})

  def write(self, step, split, metrics):
    if step <= self.logged.get(split, -1):
      return  # The run holds this step already (a resume redoes it).
    now = int(time.time() * 1000)
    batch = [Metric(f"{split}/{k}", v, now, int(step)) for k, v in scalars(metrics).items()]
    for i in range(0, len(batch), 1000):
      self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
    self.logged[split] = int(step)

  def write_samples(self, step, samples):
    self.client.log_text(self.run_id, json.dumps(samples, indent=1),
                         f"samples/step_{int(step)}.json")

  def add_file(self, step, path):
    self.client.log_artifact(self.run_id, path)

  def close(self, step):
    self.client.set_terminated(self.run_id)
