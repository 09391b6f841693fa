"""W&B (offline) and MLflow (local store) runs read back with each library's own API, kill and
resume, a tracker failing mid-run, and the sample generations at evaluation. No network: W&B
runs offline and every HTTP(S) request goes to a closed local port."""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import mlflow
import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from dpojax import generate
from dpojax.tracking import jsonl, tensorboard
from dpojax.train import loop
from dpojax.train.metrics import TIMING_METRICS
from conftest import ROOT, TINY_CONFIG, tiny_config

NO_NETWORK = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "NO_PROXY": "", "MLFLOW_TRACKING_URI": ""}
FLAGS = ["--config.train.max_steps=8", "--config.eval.interval=4",
         "--config.checkpoint.interval=4", "--config.eval.num_samples=2",
         "--config.eval.sample_max_new_tokens=8",
         "--config.logging.writers=('jsonl','tensorboard','wandb','mlflow')",
         "--config.logging.wandb.mode=offline", "--config.logging.wandb.tags=('test',)"]


def start(workdir, *flags):
  return subprocess.Popen(
      [sys.executable, "-m", "dpojax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
       *FLAGS, *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, **NO_NETWORK))


def finish(workdir, *flags):
  out, err = start(workdir, *flags).communicate(timeout=600)
  assert "Traceback" not in err, err[-3000:]
  assert "WARNING: W&B" not in out and "WARNING: MLflow" not in out, out
  return out


# --- W&B's offline run files (LevelDB log records of wandb_internal_pb2.Record) ----------------

def wandb_records(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, chunks, block = 7, [], 32768
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:  # Zero padding to the block's end.
      pos += left
      continue
    payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    chunks = [payload] if kind in (1, 2) else chunks + [payload]  # FULL/FIRST, MIDDLE/LAST.
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(chunks))
      yield record


def wandb_runs(workdir):
  """[(run id, config, [history rows])] per offline run folder, oldest first."""
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
    run_id, config, rows = None, {}, []
    for r in wandb_records(path):
      kind = r.WhichOneof("record_type")
      if kind == "run":
        run_id = r.run.run_id
        config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
      elif kind == "config":
        config.update({u.key: json.loads(u.value_json) for u in r.config.update})
      elif kind == "history":
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item})
    runs.append((run_id, config, rows))
  return runs


def wandb_history(runs):
  """The rows W&B keeps when the runs' files are synced in order: the first row of a step,
  none below the run's current step (W&B's rule for a resumed run)."""
  kept = []
  for _, _, rows in runs:
    kept += [row for row in rows if not kept or row["_step"] > kept[-1]["_step"]]
  return kept


def mlflow_run(workdir):
  with open(os.path.join(workdir, "tracking", "mlflow.json")) as f:
    run_id = json.load(f)["run_id"]
  client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(workdir)}/mlflow.db")
  return client, client.get_run(run_id)


def assert_tracked_equals_jsonl(workdir, *, timing=True):
  """Every metric of metrics.jsonl at every step, in W&B's history and MLflow's, once."""
  records = jsonl.read_records(workdir)
  skip = () if timing else TIMING_METRICS
  # A run killed before W&B wrote anything leaves a file without even its run record.
  runs = [run for run in wandb_runs(workdir) if run[0] is not None]
  assert len({run_id for run_id, _, _ in runs}) == 1
  rows = wandb_history(runs)
  steps = [row["_step"] for row in rows]
  assert steps == sorted({r["step"] for r in records})
  by_step = {row["_step"]: row for row in rows}
  client, run = mlflow_run(workdir)
  histories = {}
  for r in records:
    for key, value in r.items():
      if key in ("step", "split") or key in skip:
        continue
      name = f"{r['split']}/{key}"
      assert by_step[r["step"]][name] == value, (r["step"], name)
      if name not in histories:
        histories[name] = [(m.step, m.value) for m in client.get_metric_history(
            run.info.run_id, name)]
  for name, history in histories.items():
    split, key = name.split("/", 1)
    expected = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
    assert [s for s, _ in history] == [s for s, _ in expected], name  # Each step once.
    if key not in skip:
      assert history == expected, name
  return runs, client, run


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tracked"))
  finish(workdir)
  return workdir


@pytest.mark.slow
def test_wandb_and_mlflow_hold_every_metric_at_every_step(tracked):
  runs, client, run = assert_tracked_equals_jsonl(tracked)
  (run_id, config, rows), = runs
  assert rows == wandb_history(runs)  # Not even a duplicate for W&B to drop.
  assert config["train"]["max_steps"] == 8 and config["model"]["hidden_size"] == 32
  assert [row["_step"] for row in rows if "samples/_type" in row] == [0, 4, 8]
  assert run.data.params["train.max_steps"] == "8"
  assert run.data.params["logging.wandb.mode"] == "offline"
  assert run.info.status == "FINISHED"
  artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
  assert {"curves.png", "run_config.json", "samples.jsonl", "samples"} <= artifacts
  assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_samples_are_the_same_prompts_answered_as_generate_answers(tracked, tmp_path):
  samples = jsonl.read_records(tracked, jsonl.SAMPLES_FILE)
  steps = sorted({s["step"] for s in samples})
  assert steps == [0, 4, 8]
  prompts = [[s["prompt"] for s in samples if s["step"] == step] for step in steps]
  assert len(prompts[0]) == 2 and prompts[0] == prompts[1] == prompts[2]
  with open(tiny_config().data.val_path) as f:  # The validation file's first two prompts.
    assert prompts[0] == [json.loads(l)["prompt"] for l in f][:2]
  assert all(s["chosen"] for s in samples)
  inputs = tmp_path / "prompts.jsonl"
  inputs.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[0]))
  for step in (4, 8):
    out = tmp_path / f"out{step}.jsonl"
    assert generate.main(["--checkpoint", os.path.join(tracked, "checkpoints", str(step)),
                          "--input", str(inputs), "--output", str(out),
                          "--max_new_tokens", "8"]) == 0
    expected = [json.loads(l)["policy_ids"] for l in out.read_text().splitlines()]
    assert [s["policy_ids"] for s in samples if s["step"] == step] == expected
  (events,) = glob.glob(os.path.join(tracked, "tensorboard", "events.out.tfevents.*"))
  texts = [e.step for e in tensorboard.read_events(events)
           if e.summary.value and e.summary.value[0].tag == "samples/text_summary"]
  assert texts == [0, 4, 8]


@pytest.mark.slow
def test_kill_and_resume_continue_the_same_runs_with_no_step_missing_or_twice(tmp_path):
  workdir = str(tmp_path / "run")
  longer = "--config.train.max_steps=12"  # The kill lands well before the end.
  proc = start(workdir, longer)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:  # Past checkpoint 4, before 8.
    if os.path.exists(path) and any(json.loads(l)["step"] >= 6 for l in open(path)):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  with open(os.path.join(workdir, "tracking", "wandb.json")) as f:
    first_id = json.load(f)["run_id"]
  _, first_mlflow = mlflow_run(workdir)
  kept = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert kept and kept[-1] < 12
  out = finish(workdir, longer)
  assert f"Resumed from {os.path.join(workdir, 'checkpoints')} at step {kept[-1]}" in out
  runs, _, run = assert_tracked_equals_jsonl(workdir, timing=False)
  assert {run_id for run_id, _, _ in runs} == {first_id}
  assert run.info.run_id == first_mlflow.info.run_id and run.info.status == "FINISHED"


@pytest.mark.slow
def test_trackers_that_raise_mid_run_leave_training_running(tmp_path, monkeypatch, capsys):
  for key, value in NO_NETWORK.items():
    monkeypatch.setenv(key, value)
  real_log = wandb.sdk.wandb_run.Run.log

  def log(self, data, step=None, **kwargs):
    if step is not None and step >= 3:
      raise RuntimeError("W&B is down")
    return real_log(self, data, step=step, **kwargs)

  real_batch = mlflow.MlflowClient.log_batch

  def log_batch(self, run_id, metrics=(), **kwargs):
    if any(m.step >= 2 for m in metrics):
      raise ConnectionError("MLflow is down")
    return real_batch(self, run_id, metrics=metrics, **kwargs)

  monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
  monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch)
  config = tiny_config()
  config.logging.writers = ("jsonl", "wandb", "mlflow")
  config.logging.wandb.mode = "offline"
  out = loop.run(config, str(tmp_path))
  assert out["step"] == 6
  lines = capsys.readouterr().out.splitlines()
  warnings = [l for l in lines if l.startswith("WARNING:")]
  assert warnings == [
      "WARNING: MLflow failed at step 2 (ConnectionError: MLflow is down); the run goes on "
      "without it",
      "WARNING: W&B failed at step 3 (RuntimeError: W&B is down); the run goes on without it"]
  assert [r["step"] for r in jsonl.read_records(str(tmp_path)) if r["split"] == "train"] == [
      1, 2, 3, 4, 5, 6]
  wandb.finish()


@pytest.mark.slow
def test_lora_samples_with_the_reference_answer_equal_generate_compare_reference(tmp_path):
  config = tiny_config()
  config.lora.enabled = True
  config.lora.rank = 4
  config.train.max_steps = 3
  config.eval.num_samples = 2
  config.eval.sample_max_new_tokens = 6
  config.eval.sample_reference = True
  config.eval.sample_chosen = False
  workdir = str(tmp_path / "run")
  loop.run(config, workdir)
  samples = jsonl.read_records(workdir, jsonl.SAMPLES_FILE)
  assert [s["step"] for s in samples] == [0, 0, 3, 3]
  assert all("chosen" not in s for s in samples)
  for s in samples[:2]:  # LoRA's B starts at zero: the policy is its base, the reference.
    assert s["policy_ids"] == s["reference_ids"]
  inputs = tmp_path / "prompts.jsonl"
  inputs.write_text("".join(json.dumps({"prompt": s["prompt"]}) + "\n" for s in samples[2:]))
  out = tmp_path / "out.jsonl"
  assert generate.main(["--checkpoint", workdir, "--input", str(inputs), "--output", str(out),
                        "--max_new_tokens", "6", "--compare_reference"]) == 0
  expected = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(s["policy_ids"], s["reference_ids"]) for s in samples[2:]] == [
      (e["policy_ids"], e["reference_ids"]) for e in expected]
