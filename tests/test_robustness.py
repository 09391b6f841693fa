"""Training that survives: non-finite steps, kills (SIGKILL soak, SIGTERM), failed writes."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpojax import errors
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

@pytest.mark.slow
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


@pytest.mark.slow
def test_failed_checkpoint_stops_and_keeps_previous(tmp_path, monkeypatch):
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save_after(3))
  with pytest.raises(orbax_ckpt.CheckpointWriteError,
                     match=r"^checkpoint of step 6 could not be written to .*checkpoints \(No "
                     r"space left on device \(ENOSPC\)\); the last complete checkpoint is step 3"
                     r" in .*; stopping"):
    loop.run(tiny_config(), str(tmp_path))
  assert final_params(str(tmp_path))[0] == 3


@pytest.mark.slow
def test_failed_best_checkpoint_stops_and_names_it(tmp_path, monkeypatch):
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save_after(0, folder="best"))
  with pytest.raises(orbax_ckpt.CheckpointWriteError,
                     match=r"^best checkpoint of step 3 could not be written to .*best \(No space"
                     r" left on device \(ENOSPC\)\); no checkpoint has been written yet; stop"):
    loop.run(tiny_config(), str(tmp_path))


@pytest.mark.slow
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
  with pytest.raises(errors.ConfigError, match="--workdir=.*file/run is not writable"):
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


# --- a full disk, for real: the storage layer refuses the write -------------------------------

def cli(workdir, *flags, file_limit_kb=None):
  """The training CLI; with `file_limit_kb` (ulimit -f) no file it writes may grow past that
  size, so tensorstore's writes fail with EFBIG the way a full disk fails them with ENOSPC
  (same path: ValueError 'OUT_OF_RANGE: Error writing ... [os_error_code='27']'). SIGXFSZ is
  ignored so that the write fails instead of killing the process."""
  command = [sys.executable, "-m", "dpojax.main", f"--config={TINY_CONFIG}",
             f"--workdir={workdir}", *flags]
  if file_limit_kb:  # A shell, not preexec_fn: no fork() of this (threaded) JAX process.
    command = ["bash", "-c", f"trap '' XFSZ; ulimit -f {file_limit_kb}; exec \"$0\" \"$@\"",
               *command]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def error_lines(stderr):
  """stderr without absl's warnings about the data (lines starting W<date>)."""
  return [l for l in stderr.splitlines() if l and not (l[0] == "W" and l[1:5].isdigit())]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """A run stopped at step 3 (checkpoint 3, best/3): the last good checkpoint."""
  workdir = str(tmp_path_factory.mktemp("three"))
  config = tiny_config()
  config.train.max_steps = 3
  loop.run(config, workdir)
  return workdir


# The tiny model's state files are 70-160 KB; metrics, events and run config stay far below.
FILE_LIMIT_KB = 32
FULL_DISK_CASES = {
    "best": (["--config.checkpoint.keep_best=True"], "best checkpoint of step 6", "best"),
    "step": (["--config.checkpoint.keep_best=False"], "checkpoint of step 6", "checkpoints"),
    # Async: step 6's write fails in the background; it surfaces at the save of step 9.
    "async": (["--config.checkpoint.keep_best=False", "--config.checkpoint.async_save=True"],
              "checkpoint of step 6", "checkpoints"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FULL_DISK_CASES))
def test_full_disk_stops_with_one_line_and_keeps_the_last_good(three_steps, tmp_path, case):
  flags, what, folder = FULL_DISK_CASES[case]
  workdir = str(tmp_path / "run")
  shutil.copytree(three_steps, workdir)
  proc = cli(workdir, "--config.train.max_steps=9", *flags, file_limit_kb=FILE_LIMIT_KB)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert error_lines(proc.stderr) == [
      f"error: {what} could not be written to {os.path.join(workdir, folder)} (File too large "
      f"(EFBIG)); the last complete checkpoint is step 3 in "
      f"{os.path.join(workdir, 'checkpoints')}; stopping (checkpoint.on_error=stop)"]
  assert final_params(workdir)[0] == 3
  if case == "async":  # The failed attempt left the last good one intact: resume is exact.
    config = tiny_config()
    config.train.max_steps = 9
    config.checkpoint.keep_best = False
    straight = str(tmp_path / "straight")
    shutil.copytree(three_steps, straight)
    loop.run(config, straight)
    loop.run(config, workdir)
    assert final_params(workdir)[0] == 9
    assert_bitwise(final_params(straight)[1], final_params(workdir)[1])


@pytest.mark.slow
def test_full_disk_with_on_error_continue_trains_on_and_says_so(three_steps, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_steps, workdir)
  proc = cli(workdir, "--config.train.max_steps=9", "--config.checkpoint.on_error=continue",
             file_limit_kb=FILE_LIMIT_KB)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and not error_lines(proc.stderr), proc.stderr[-3000:]
  warnings = [l for l in proc.stdout.splitlines() if "could not be written" in l]
  assert [w.split(" could not")[0] for w in warnings] == [
      "WARNING: best checkpoint of step 6", "WARNING: checkpoint of step 6",
      "WARNING: best checkpoint of step 9", "WARNING: checkpoint of step 9",
      "WARNING: curves.png of step 9"]  # The PNG (144 KB) is over the limit too.
  assert all(w.endswith("the last complete checkpoint is step 3 in "
                        f"{os.path.join(workdir, 'checkpoints')}; continuing "
                        "(checkpoint.on_error=continue)") for w in warnings)
  assert [r["step"] for r in metrics(workdir) if r["split"] == "train"][-1] == 9
  assert final_params(workdir)[0] == 3


# --- SIGTERM during start-up -----------------------------------------------------------------

def caught_signals(pid) -> int:
  with open(f"/proc/{pid}/status") as f:
    return int(next(l for l in f if l.startswith("SigCgt:")).split()[1], 16)


@pytest.mark.slow
def test_sigterm_at_the_first_moment_exits_zero_saying_nothing_was_saved(tmp_path):
  """SIGTERM as soon as the CLI handles it (main.py's first lines, before its imports)."""
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
      [sys.executable, "-m", "dpojax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  while proc.poll() is None and not caught_signals(proc.pid) & (1 << (signal.SIGTERM - 1)):
    time.sleep(0.001)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert out.splitlines()[-1] == (
      "Received signal 15 before the first step: nothing was saved yet; run again with the "
      "same --workdir to start or resume.")
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_sigterm_during_start_up_of_a_resumed_run(three_steps, tmp_path):
  """SIGTERM once the run config is written (start-up: mesh, init, restore still to come):
  exit 0, and the line says what the workdir holds."""
  workdir = str(tmp_path / "run")
  shutil.copytree(three_steps, workdir)
  config_file = os.path.join(workdir, "run_config.json")
  os.remove(config_file)
  proc = start(workdir)
  while proc.poll() is None and not os.path.exists(config_file):
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  last = out.splitlines()[-1]
  latest = final_params(workdir)[0]
  if "before the first step" in last:
    assert latest == 3 and "nothing new was saved; the latest checkpoint is still step 3 in " \
        f"{os.path.join(workdir, 'checkpoints')}" in last
  else:  # The signal landed after start-up: that step was saved.
    assert last.startswith(f"Received signal 15: saved step {latest} to "), last
    assert latest > 3
