"""Training-state checkpoints with Orbax: the train state plus the data iterator's state.

Orbax writes each step into a temporary folder and renames it when complete, so a crash or
kill mid-save leaves the previous checkpoint as the latest restorable one; leftover temporary
folders are removed when the manager starts. A second manager keeps the best checkpoint by
validation loss.

A write the storage refuses (disk full, file too large, permissions) is raised as `WriteFailed`
naming its step; an async save's failure surfaces at the next save, `wait` or `close`, still
under the step it was for. Anything else (a bug) propagates unchanged. The training loop saves
through `save_checkpoint` and `close_checkpoints`, which apply checkpoint.on_error to such a
failure (stop with `CheckpointWriteError`, or warn and continue).
"""

from __future__ import annotations

import contextlib
import glob
import logging as py_logging
import os
import shutil
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from dpojax.tracking import policy
from dpojax.tracking.policy import storage_reason


def _manager(directory: str, item_names, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=item_names, options=ocp.CheckpointManagerOptions(
      create=True, cleanup_tmp_directories=True, **options))


class WriteFailed(Exception):
  """The storage refused a checkpoint write; the previous checkpoints are untouched."""

  def __init__(self, step: int, directory: str, reason: str):
    super().__init__(f"checkpoint of step {step} could not be written to {directory} ({reason})")
    self.step, self.directory, self.reason = step, directory, reason


@contextlib.contextmanager
def _writing(step, directory):
  try:
    yield
  except Exception as e:  # pylint: disable=broad-exception-caught
    reason = storage_reason(e)
    if reason is None:
      raise
    raise WriteFailed(step, directory, reason) from e


class _NoBackgroundTracebacks(py_logging.Filter):
  """Drops the log records of a failed background write (Orbax's threads; asyncio's 'Task
  exception was never retrieved' for its sibling writes): the same error raises to the caller
  (save, wait, close), which reports it once."""

  def filter(self, record):
    if record.levelno < py_logging.ERROR or not record.exc_info:
      return True
    if f"{os.sep}orbax{os.sep}" in record.pathname:
      return False
    return not (record.name == "asyncio" and storage_reason(record.exc_info[1]) is not None)


def _is_write_aftermath(unraisable) -> bool:
  """After one write of a save fails, tensorstore completes the others into Orbax's closed
  event loop ('Event loop is closed'), and their coroutines die at exit: Python reports each
  as unraisable, with a traceback."""
  code = getattr(unraisable.object, "cr_code", None)
  return (str(unraisable.exc_value) == "Event loop is closed"
          or f"{os.sep}orbax{os.sep}" in getattr(code, "co_filename", ""))


def quiet_background_errors():
  """For the CLI: no traceback per Orbax thread or tensorstore callback when a write fails (the
  error itself still raises from save, wait or close)."""
  for logger in (absl_logging.get_absl_logger(), py_logging.getLogger("asyncio")):
    if not any(isinstance(f, _NoBackgroundTracebacks) for f in logger.filters):
      logger.addFilter(_NoBackgroundTracebacks())
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if _is_write_aftermath(u) else previous(u)
  # The sibling writes' coroutines that the failed save never awaited, reported at exit.
  warnings.filterwarnings("ignore", r"coroutine '\S*(serializ|write)\S*' was never awaited",
                          RuntimeWarning)


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
               keep_best: bool = True):
    root = os.path.abspath(workdir)
    self.directory = os.path.join(root, "checkpoints")
    self.manager = _manager(self.directory, ("state", "data"), max_to_keep=max_to_keep,
                            enable_async_checkpointing=async_save)
    self.best = None
    self.best_directory = os.path.join(root, "best")
    self._pending = None  # The step of an async save in flight (its failure shows later).
    self._failed = []  # (directory, step) of failed saves whose partial folders must go.
    self._failed_any = False
    if keep_best:
      self.best = _manager(self.best_directory, ("state", "data"), max_to_keep=1,
                           best_fn=lambda m: m["val_loss"], best_mode="min",
                           enable_async_checkpointing=async_save)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict):
    self.wait()  # A failed async save raises here, under its own step.
    self.sweep()
    with _writing(step, self.directory):
      self.manager.save(step, args=_save_args(state, data_state), force=True)
    self._pending = step

  def save_if_best(self, step: int, state, data_state: dict, val_loss: float) -> bool:
    """Keeps `state` under <workdir>/best if its validation loss is the lowest so far."""
    if self.best is None or step in self.best.all_steps():
      return False  # A resumed run recomputes a validation it had already kept.
    previous = self.best.best_step()
    self.sweep()
    with _writing(step, self.best_directory):
      self.best.save(step, args=_save_args(state, data_state),
                     metrics={"val_loss": float(val_loss)}, force=True)
      self.best.wait_until_finished()
    return self.best.best_step() != previous

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings and dtypes of `abstract_state` (a tree of arrays)."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self):
    step, self._pending = self._pending, None
    with _writing(step, self.directory):
      self.manager.wait_until_finished()

  def close(self):
    """Waits for the last save; the managers close even if it failed (then it raises)."""
    try:
      self.wait()
    finally:
      for m in (self.manager, self.best):
        if m is not None:
          try:
            m.close()
          except Exception as e:  # pylint: disable=broad-exception-caught
            # A failed save's sibling writes, ending after it was reported: no news.
            if storage_reason(e) is None or not self._failed_any:
              raise
      self.sweep(everything=True)

  def settle(self):
    """Lets an async save in flight finish (or fail: the run is stopping on another failure,
    so that one is not reported twice)."""
    self._pending = None
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-exception-caught
      pass

  def forget(self, directory: str, step: int):
    """A failed save: its partial folder goes at the next save or at close (not now: the
    save's other writes may still be running in Orbax's threads)."""
    self._failed.append((directory, step))
    self._failed_any = True

  def sweep(self, everything: bool = False):
    """Removes the partial folders of the failed saves; `everything` (the managers closed,
    nothing in flight): every partial folder, also one a failed save's last write made again
    after it was first removed."""
    for directory, step in self._failed:
      remove_partial(directory, step)
    if everything and self._failed_any and jax.process_index() == 0:
      for directory in (self.directory, self.best_directory):
        remove_partial(directory)
    self._failed = []


def save_checkpoint(ckpt, step, state, data_state, config, say, best_loss=None):
  """Saves step `step` (or, with `best_loss`, keeps it under best/ if it is the best so far).

  A write the storage refuses leaves the previous checkpoints restorable (Orbax writes to a
  temporary folder and renames when complete); training stops or continues by
  checkpoint.on_error. An async save's failure surfaces here at the next save, under its step.
  """
  try:
    if best_loss is not None:
      ckpt.save_if_best(step, state, data_state, best_loss)
      return
    ckpt.save(step, state, data_state)
    if not config.checkpoint.async_save:
      ckpt.wait()
  except WriteFailed as e:
    write_failed(ckpt, e, config, say)
    if best_loss is None and e.step != step:  # An earlier async save failed; try this one.
      save_checkpoint(ckpt, step, state, data_state, config, say)


def close_checkpoints(ckpt, config, say):
  """Waits for the last (async) save; its failure is handled as any other."""
  try:
    ckpt.close()
  except WriteFailed as e:
    write_failed(ckpt, e, config, say)
    ckpt.sweep(everything=True)  # The managers are closed: nothing writes any more.


def write_failed(ckpt, error, config, say):
  """checkpoint.on_error for a refused save (tracking.policy, as for every writer of a run);
  with `continue`, the failed save's partial folder goes, so a full disk does not stay full.
  The message names the last *complete* checkpoint (on disk), never one still in flight."""
  what = "best checkpoint" if error.directory == ckpt.best_directory else "checkpoint"
  if config.checkpoint.on_error == "continue":
    ckpt.forget(error.directory, error.step)
  else:  # Stopping: an async save in flight ends first, so the line names what is complete.
    ckpt.settle()
  try:
    policy.refused(what, error.step, error.directory, error.reason, ckpt.directory,
                   config.checkpoint.on_error, say, CheckpointWriteError)
  except CheckpointWriteError as e:
    raise e from error


def remove_partial(directory: str, step=None) -> list[str]:
  """Removes step `step`'s N.orbax-checkpoint-tmp* folders (a failed save's leftovers), or
  every step's with step=None."""
  prefix = "*" if step is None else str(int(step))
  removed = sorted(glob.glob(os.path.join(glob.escape(directory),
                                          f"{prefix}.orbax-checkpoint-tmp*")))
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  return removed


class CheckpointWriteError(policy.WriteError):
  """A checkpoint could not be written."""


def _save_args(state, data_state):
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(data_state))


def load_params(path: str, init_fn):
  """Policy parameters from a dpojax workdir (latest step), its checkpoints/ folder, or one
  step folder; `init_fn(rng)` gives their structure."""
  path = os.path.abspath(path)
  for candidate in (os.path.join(path, "checkpoints"), path, os.path.dirname(path)):
    if os.path.isdir(candidate):
      manager = ocp.CheckpointManager(candidate, item_names=("state", "data"))
      step = manager.latest_step()
      if candidate == os.path.dirname(path) and os.path.basename(path).isdigit():
        step = int(os.path.basename(path))
      if step is not None:
        break
  else:
    raise FileNotFoundError(f"init.path={path}: no dpojax checkpoint found")
  if step is None:
    raise FileNotFoundError(f"init.path={path}: no dpojax checkpoint found")
  abstract_params = jax.eval_shape(init_fn, jax.random.key(0))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": abstract_params},
          restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray),
                                    {"params": abstract_params}),
          partial_restore=True)))
  return restored.state["params"]
