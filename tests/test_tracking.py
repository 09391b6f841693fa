"""dpojax.tracking: the writers' seam, the one failure policy (with a real full filesystem),
the step-time split and MFU."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpojax import errors
from dpojax.checkpoint import orbax as orbax_ckpt
from dpojax.tracking import jsonl, policy, tensorboard, timing, writers as writers_lib
from dpojax.tracking.base import Writer
from dpojax.train import metrics as metrics_lib
from conftest import ROOT, TINY_CONFIG, tiny_config


# --- a real full filesystem --------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
  """A 3 MiB tmpfs (we run as root); skipped only where mounting is not permitted."""
  mount = tmp_path / "disk"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
  yield str(mount)
  subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave_bytes=0):
  """A ballast file that leaves about `leave_bytes` free; returns its path."""
  ballast = os.path.join(disk, "ballast")
  st = os.statvfs(disk)
  size = max(st.f_bavail * st.f_frsize - leave_bytes, 0)
  with open(ballast, "wb") as f:
    try:
      f.write(b"\0" * size)
    except OSError:  # Full: what we want.
      pass
  return ballast


def test_jsonl_and_tensorboard_write_whole_records_or_none_on_a_full_disk(small_disk):
  workdir = os.path.join(small_disk, "run")
  j, tb = jsonl.JsonlWriter(workdir, -1), tensorboard.TensorBoardWriter(workdir)
  for w in (j, tb):
    w.write(1, "train", {"loss": 0.5})
  sizes = [os.path.getsize(j.path), os.path.getsize(tb.path)]
  ballast = fill(small_disk)
  big = {f"metric_{i}": float(i) for i in range(2000)}  # Larger than a page: no room.
  for w in (j, tb):
    with pytest.raises(OSError) as e:
      w.write(2, "train", big)
    assert policy.storage_reason(e.value) == "No space left on device"
  assert [os.path.getsize(j.path), os.path.getsize(tb.path)] == sizes  # Cut back off.
  os.remove(ballast)
  for w in (j, tb):
    w.write(3, "train", {"loss": 0.25})
    w.close(3)
  assert [(r["step"], r["loss"]) for r in jsonl.read_records(workdir)] == [(1, 0.5), (3, 0.25)]
  events = tensorboard.read_events(tb.path)
  assert events[0].file_version == "brain.Event:2"
  assert [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value)
          for e in events[1:]] == [(1, "train/loss", 0.5), (3, "train/loss", 0.25)]


def writers_on(disk, on_error, said):
  workdir = os.path.join(disk, "run")
  os.makedirs(os.path.join(workdir, "checkpoints", "4"))  # Complete: renamed by Orbax.
  os.makedirs(os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp"))  # In flight.
  w = writers_lib.Writers(on_error=on_error, checkpoints=os.path.join(workdir, "checkpoints"),
                          say=said.append)
  w.add(0, "metrics.jsonl", "", True, lambda: jsonl.JsonlWriter(workdir, -1))
  return w, workdir


def test_a_full_disk_stops_naming_the_step_and_the_last_complete_checkpoint(small_disk):
  said = []
  w, workdir = writers_on(small_disk, "stop", said)
  fill(small_disk)
  with pytest.raises(policy.WriteError) as e:
    w.write(9, "train", {f"m{i}": 1.0 for i in range(2000)})
  assert str(e.value) == (
      f"metrics.jsonl of step 9 could not be written to {workdir}/metrics.jsonl (No space "
      f"left on device); the last complete checkpoint is step 4 in {workdir}/checkpoints; "
      "stopping (checkpoint.on_error=stop)")
  assert not said


def test_a_full_disk_with_continue_warns_once_per_failure(small_disk):
  said = []
  w, workdir = writers_on(small_disk, "continue", said)
  ballast = fill(small_disk)
  big = {f"m{i}": 1.0 for i in range(2000)}
  w.write(9, "train", big)
  w.write(9, "val", big)  # The same writer, step and reason: one line.
  w.write(10, "train", big)
  assert said == [
      f"WARNING: metrics.jsonl of step {s} could not be written to {workdir}/metrics.jsonl "
      f"(No space left on device); the last complete checkpoint is step 4 in {workdir}/"
      "checkpoints; continuing (checkpoint.on_error=continue)" for s in (9, 10)]
  os.remove(ballast)
  w.write(11, "train", {"loss": 1.0})
  w.close(11)
  assert [r["step"] for r in jsonl.read_records(workdir)] == [11]


class Raising(Writer):
  local, what = False, "Tracker"

  def __init__(self):
    self.calls = 0

  def write(self, step, split, metrics):
    self.calls += 1
    raise ConnectionError("service unreachable")


class Buggy(Writer):
  what = "local"

  def write(self, step, split, metrics):
    raise KeyError("a bug")


def test_a_tracker_failure_is_one_warning_and_a_local_bug_keeps_its_traceback(tmp_path):
  said = []
  w = writers_lib.Writers(on_error="stop", checkpoints=str(tmp_path), say=said.append)
  tracker = Raising()
  w.writers.append(tracker)
  for step in range(3):
    w.write(step, "train", {"loss": 1.0})
  assert tracker.calls == 1 and not w.writers
  assert said == ["WARNING: Tracker failed at step 0 (ConnectionError: service unreachable); "
                  "the run goes on without it"]
  w.writers.append(Buggy())
  with pytest.raises(KeyError):
    w.write(3, "train", {"loss": 1.0})


def test_last_complete_step_never_names_one_in_flight(tmp_path):
  for name in ("3", "6", "9.orbax-checkpoint-tmp", "12.orbax-checkpoint-tmp-1234"):
    (tmp_path / name).mkdir()
  assert policy.last_complete_step(str(tmp_path)) == 6
  assert policy.last_complete_step(str(tmp_path / "none")) is None
  assert orbax_ckpt.remove_partial(str(tmp_path), 12) == [
      str(tmp_path / "12.orbax-checkpoint-tmp-1234")]
  assert sorted(os.listdir(tmp_path)) == ["3", "6", "9.orbax-checkpoint-tmp"]


def test_missing_tracker_package_is_a_config_error(monkeypatch):
  config = tiny_config()
  config.logging.writers = ("jsonl", "wandb")
  real = writers_lib.importlib.util.find_spec
  monkeypatch.setattr(writers_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(errors.ConfigError, match=r"^logging.writers includes 'wandb' but the "
                     r"wandb package is not installed: pip install -e '.\[wandb\]'$"):
    writers_lib.check_available(config)
  config.logging.writers = ("jsonl", "csv")
  with pytest.raises(errors.ConfigError, match="logging.writers: 'csv' is not one of"):
    writers_lib.check_available(config)


@pytest.mark.slow
def test_missing_tracker_package_fails_the_cli_before_compiling(tmp_path):
  """One error line, exit 1, within the start-up (the package hidden from the child)."""
  hide = tmp_path / "hide"
  hide.mkdir()
  # sys.modules[name] = None: what Python itself reads as "not importable".
  (hide / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), ROOT]))
  proc = subprocess.run(
      [sys.executable, "-m", "dpojax.main", f"--config={TINY_CONFIG}",
       f"--workdir={tmp_path / 'run'}", "--config.logging.writers=('jsonl','mlflow')"],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: logging.writers includes 'mlflow' but the mlflow package is not installed: "
      "pip install -e '.[mlflow]'")
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


# --- step time and MFU ---------------------------------------------------------------------

def test_phase_timer_keeps_evaluation_and_checkpoints_out_of_step_time():
  timer = timing.PhaseTimer()
  start = time.perf_counter()
  for name, seconds in (("data", 0.02), ("compute", 0.03), ("eval", 0.05),
                        ("checkpoint", 0.04), ("compute", 0.03)):
    with timer.phase(name):
      time.sleep(seconds)
  elapsed = time.perf_counter() - start
  eval_time = timer.take("eval")["eval"]
  record = timer.train_record(steps=2)
  assert record["step_time"] == pytest.approx(record["data_time"] + record["compute_time"])
  assert record["data_time"] >= 0.02 / 2 and record["compute_time"] >= 0.06 / 2
  assert record["checkpoint_time"] >= 0.04 and eval_time >= 0.05
  # Disjoint phases: the steps' time leaves the evaluation and the checkpoint out.
  assert 2 * record["step_time"] + record["checkpoint_time"] + eval_time <= elapsed
  assert timer.take("eval")["eval"] == 0.0


def test_mfu_never_above_one_and_none_on_cpu():
  throughput = metrics_lib.Throughput(flops_per_token=1e6, peak_flops=1e9)
  throughput.add(pairs=1, tokens=2000)
  first = throughput.report(seconds=1.0)  # 2e9 FLOP/s: faster than the "peak".
  assert first["mfu"] == 1.0 and throughput.peak == 2e9
  throughput.add(pairs=1, tokens=1000)
  assert throughput.report(seconds=1.0)["mfu"] == 0.5
  said = []
  assert timing.mfu_peak(0.0, "float32", said.append) == -1.0  # The tests run on CPU.
  assert said == ["MFU: not reported on CPU (no fixed peak); set train.peak_flops=FLOP/s to "
                  "report it"]
  assert timing.mfu_peak(5e12, "float32", said.append) == 5e12


def test_memory_metric_is_the_host_peak_on_cpu():
  (name, value), = timing.memory_metrics().items()
  assert name == "peak_host_rss_gb" and 0.05 < value < 1000


# --- the run on a full disk (a real tmpfs) ------------------------------------------------

def cli(workdir, *flags):
  return subprocess.run(
      [sys.executable, "-m", "dpojax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
       "--config.train.max_steps=9", "--config.checkpoint.max_to_keep=5", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600)


def errors_only(stderr):
  return [l for l in stderr.splitlines() if l and not (l[0] in "WI" and l[1:5].isdigit())]


# Room for the run's first checkpoint and its best copy (about 350 KB each), not a second.
ROOM = 900_000


@pytest.mark.slow
def test_full_tmpfs_stops_with_one_line_naming_the_last_complete_checkpoint(small_disk):
  workdir = os.path.join(small_disk, "run")
  os.makedirs(workdir)
  fill(small_disk, leave_bytes=ROOM)
  proc = cli(workdir, "--config.checkpoint.async_save=True")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  (line,) = errors_only(proc.stderr)
  match = re.fullmatch(r"error: (.+) of step (\d+) could not be written to (\S+) \(No space "
                       r"left on device.*\); the last complete checkpoint is step (\d+) in "
                       r"(\S+); stopping \(checkpoint.on_error=stop\)", line)
  directory = os.path.join(workdir, "checkpoints")
  if match is None:  # The first checkpoint itself failed: the line says so.
    assert re.fullmatch(r"error: .+ could not be written to .+; no checkpoint has been written "
                        r"yet; stopping \(checkpoint.on_error=stop\)", line), line
    assert policy.last_complete_step(directory) is None
    return
  named = int(match.group(4))
  assert match.group(5) == directory and int(match.group(2)) > named
  assert policy.last_complete_step(directory) == named  # It exists, complete, on disk...
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  restored = manager.restore(named, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  assert restored.state["step"] == named  # ...and restores.


@pytest.mark.slow
def test_full_tmpfs_at_start_up_stops_at_the_run_config(small_disk):
  """Not a checkpoint: the first write of a run, on a disk with no room at all."""
  workdir = os.path.join(small_disk, "run")
  os.makedirs(workdir)
  fill(small_disk)
  proc = cli(workdir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert errors_only(proc.stderr) == [
      f"error: run_config.json of step 0 could not be written to {workdir}/run_config.json (No "
      "space left on device); no checkpoint has been written yet; stopping "
      "(checkpoint.on_error=stop)"]
  assert os.listdir(workdir) == []  # Its partial .tmp removed too.


@pytest.mark.slow
def test_full_tmpfs_with_continue_trains_on_and_cleans_its_partial_folders(small_disk):
  workdir = os.path.join(small_disk, "run")
  os.makedirs(workdir)
  fill(small_disk, leave_bytes=ROOM)
  proc = cli(workdir, "--config.checkpoint.on_error=continue",
             "--config.checkpoint.async_save=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and not errors_only(proc.stderr), proc.stderr[-3000:]
  warnings = [l for l in proc.stdout.splitlines() if l.startswith("WARNING:")]
  assert warnings and all(w.endswith("continuing (checkpoint.on_error=continue)")
                          for w in warnings), warnings
  assert len(warnings) == len(set(warnings)), warnings  # One per writer, step and reason.
  for w in warnings:  # Never the failed step, nor one in flight: a complete one, or none.
    found = re.search(r"of step (\d+) .* complete checkpoint is step (\d+)", w)
    assert (int(found.group(2)) < int(found.group(1)) if found
            else "no checkpoint has been written yet" in w), w
  for folder in ("checkpoints", "best"):
    left = [n for n in os.listdir(os.path.join(workdir, folder)) if "tmp" in n]
    assert not left, (folder, left)
  records = jsonl.read_records(workdir)  # Every line whole.
  assert [r["step"] for r in records if r["split"] == "train"][-1] == 9
