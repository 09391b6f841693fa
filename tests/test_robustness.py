"""Training that survives: non-finite steps, kills (SIGKILL soak, SIGTERM), failed writes."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpojax.checkpoint.orbax import Checkpointer
from dpojax.train import loop

from dpojax.train.metrics import TIMING_METRICS
from conftest import ROOT, TINY_CONFIG, tiny_config


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def assert_same_records(a, b):
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for ra, rb in zip(a, b):
    assert {k: v for k, v in ra.items() if k not in TIMING_METRICS} == {
        k: v for k, v in rb.items() if k not in TIMING_METRICS}, ra["step"]


def final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "data"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, state.state["params"]


def assert_bitwise(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# --- non-finite guard -----------------------------------------------------------------------

@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(tmp_path):
  config = tiny_config()
  config.train.max_steps = 1
  one = loop.run(config, str(tmp_path / "one"))
  config.train.max_steps = 2
  config.debug.inject_nonfinite_at = (2,)
  two = loop.run(config, str(tmp_path / "two"))
  # Step 2 was refused: parameters and optimizer state are exactly those after step 1.
  assert_bitwise(one["state"].params, two["state"].params)
  assert_bitwise(one["state"].opt_state, two["state"].opt_state)
  train = [r for r in metrics(str(tmp_path / "two")) if r["split"] == "train"]
  assert train[0]["nonfinite_steps"] == 0 and train[1]["nonfinite_steps"] == 1
  assert np.isnan(train[1]["loss"])


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path):
  config = tiny_config()
  config.train.max_steps = 10
  config.checkpoint.interval = 2
  config.train.max_consecutive_nonfinite = 3
  config.debug.inject_nonfinite_at = (5, 6, 7)
  with pytest.raises(loop.NonFiniteError, match=r"3 consecutive non-finite steps .* step 7.*"
                     r"last good checkpoint is step 6"):
    loop.run(config, str(tmp_path))
  step, params = final_params(str(tmp_path))
  assert step == 6
  assert jax.tree.leaves(params)


# --- checkpoint writes that fail ---------------------------------------------------------------

def failing_save_after(step_limit):
  original = Checkpointer.save

  def save(self, step, state, data_state):
    if step > step_limit:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, state, data_state)

  return save


@pytest.mark.slow
def test_failed_checkpoint_stops_and_keeps_previous(tmp_path, monkeypatch):
  monkeypatch.setattr(Checkpointer, "save", failing_save_after(3))
  with pytest.raises(loop.CheckpointWriteError,
                     match=r"step 6 could not be written .*No space left on device.*last "
                     r"complete checkpoint is step 3; stopping"):
    loop.run(tiny_config(), str(tmp_path))
  assert final_params(str(tmp_path))[0] == 3


@pytest.mark.slow
def test_failed_checkpoint_can_continue(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(Checkpointer, "save", failing_save_after(3))
  config = tiny_config()
  config.checkpoint.on_error = "continue"
  out = loop.run(config, str(tmp_path))
  assert out["step"] == 6
  assert "continuing (checkpoint.on_error=continue)" in capsys.readouterr().out
  assert final_params(str(tmp_path))[0] == 3


def test_unwritable_workdir_fails_before_compiling(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(loop.ConfigError, match="--workdir=.*file/run is not writable"):
    loop.run(tiny_config(), str(blocker / "run"))


# --- kills ---------------------------------------------------------------------------------------

SOAK_FLAGS = ["--config.train.max_steps=24", "--config.checkpoint.interval=4",
              "--config.eval.interval=5", "--config.checkpoint.async_save=True"]


def start(workdir):
  return subprocess.Popen(
      [sys.executable, "-m", "dpojax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
       *SOAK_FLAGS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(workdir, n, proc, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= n:
          return
    time.sleep(0.02)


def finish(workdir):
  proc = start(workdir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  finish(workdir)
  return workdir


@pytest.mark.slow
def test_sigkill_soak_resumes_bitwise(uninterrupted, tmp_path):
  """SIGKILL at random moments (steps, evaluations, async checkpoint writes); each time the
  run resumes; the end is bitwise the uninterrupted run."""
  workdir = str(tmp_path)
  rng = random.Random(0)
  for records in (4, 20):  # Progress points in the run (about 30 records in all).
    proc = start(workdir)
    wait_for_records(workdir, records, proc)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
  finish(workdir)
  assert_same_records(metrics(uninterrupted), metrics(workdir))
  step_a, params_a = final_params(uninterrupted)
  step_b, params_b = final_params(workdir)
  assert step_a == step_b == 24
  assert_bitwise(params_a, params_b)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  proc = start(workdir)
  wait_for_records(workdir, 10, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Received signal 15: saved step" in out
  stopped_at = int(out.split("saved step ")[1].split()[0])
  assert 0 < stopped_at < 24 and final_params(workdir)[0] == stopped_at
  finish(workdir)
  assert_same_records(metrics(uninterrupted), metrics(workdir))
  assert_bitwise(final_params(uninterrupted)[1], final_params(workdir)[1])
