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

from dpojax.checkpoint import orbax as orbax_ckpt
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

def test_nonfinite_step_is_skipped_and_counted(tmp_path, capsys):
  config = tiny_config()
  config.train.max_steps = 1
  one = loop.run(config, str(tmp_path / "one"))
  config.train.max_steps = 2
  config.debug.inject_nonfinite_at = (2,)
  two = loop.run(config, str(tmp_path / "two"))
  # The log line names the source file and the lines of the step's 8 pairs (1-based, real).
  line = next(l for l in capsys.readouterr().out.splitlines() if "non-finite" in l)
  path = config.data.train_path
  assert line.startswith(f"Step 2: non-finite loss or gradient; update skipped (pairs: {path}, "
                         "lines ")
  numbers = [int(n) for n in line.split("lines ")[1].rstrip(")").split(",")]
  with open(path) as f:
    count = sum(1 for _ in f)
  assert len(numbers) == 8 and all(1 <= n <= count for n in numbers)
  # Step 2 was refused: parameters and optimizer state are exactly those after step 1.
  assert_bitwise(one["state"].params, two["state"].params)
  assert_bitwise(one["state"].opt_state, two["state"].opt_state)
  train = [r for r in metrics(str(tmp_path / "two")) if r["split"] == "train"]
  assert train[0]["nonfinite_steps"] == 0 and train[1]["nonfinite_steps"] == 1
  assert np.isnan(train[1]["loss"])


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

# What tensorstore raises (through Orbax, unchanged) when the disk is full mid-save.
ENOSPC_TEXT = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.mu.embedding/0.0" in OCDBT '
               'database at local file "/w/checkpoints/6.orbax-checkpoint-tmp/state.orbax-'
               'checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/.../d/9f": Failed to write '
               "615963 bytes to file 7: No space left on device [os_error_code='28']")


def failing_save_after(step_limit, folder="checkpoints"):
  """Orbax's manager.save under `folder` raises tensorstore's full-disk error past a step."""
  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step > step_limit and os.path.basename(str(self.directory)) == folder:
      raise ValueError(ENOSPC_TEXT)
    return original(self, step, *args, **kwargs)

  return save


def test_storage_reason_tells_refused_writes_from_bugs():
  assert orbax_ckpt.storage_reason(ValueError(ENOSPC_TEXT)) == (
      "No space left on device (ENOSPC)")
  try:  # Wrapped, as Orbax's futures may: the cause still counts.
    raise RuntimeError("save failed") from ValueError(ENOSPC_TEXT.replace("28", "27"))
  except RuntimeError as e:
    assert orbax_ckpt.storage_reason(e) == "File too large (EFBIG)"
  assert orbax_ckpt.storage_reason(OSError(errno.EACCES, "Permission denied")) == (
      "Permission denied")
  assert orbax_ckpt.storage_reason(ValueError("Shapes (3,) and (4,) differ")) is None
  assert orbax_ckpt.storage_reason(KeyError("params")) is None


def test_a_bug_in_a_save_is_not_a_write_failure(tmp_path, monkeypatch):
  def save(self, step, *args, **kwargs):
    raise ValueError("Shapes (3,) and (4,) differ")
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(ValueError, match="Shapes"):  # Its own traceback, not 'could not write'.
    ckpt.save(1, {"x": np.zeros(2)}, {})
  ckpt.close()


def test_failed_checkpoint_stops_and_keeps_previous(tmp_path, monkeypatch):
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save_after(3))
  with pytest.raises(loop.CheckpointWriteError,
                     match=r"^checkpoint of step 6 could not be written to .*checkpoints \(No "
                     r"space left on device \(ENOSPC\)\); the last complete checkpoint is step 3"
                     r" in .*; stopping"):
    loop.run(tiny_config(), str(tmp_path))
  assert final_params(str(tmp_path))[0] == 3


def test_failed_best_checkpoint_stops_and_names_it(tmp_path, monkeypatch):
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save_after(0, folder="best"))
  with pytest.raises(loop.CheckpointWriteError,
                     match=r"^best checkpoint of step 3 could not be written to .*best \(No space"
                     r" left on device \(ENOSPC\)\); no checkpoint has been written yet; stop"):
    loop.run(tiny_config(), str(tmp_path))


def test_failed_checkpoint_can_continue(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save_after(3))
  config = tiny_config()
  config.checkpoint.on_error = "continue"
  out = loop.run(config, str(tmp_path))
  assert out["step"] == 6
  out_text = capsys.readouterr().out
  assert ("checkpoint of step 6 could not be written" in out_text
          and "continuing (checkpoint.on_error=continue)" in out_text)
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
