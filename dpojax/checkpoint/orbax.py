"""Training-state checkpoints with Orbax: the train state plus the data iterator's state.

Orbax writes each step into a temporary folder and renames it when complete, so a crash or
kill mid-save leaves the previous checkpoint as the latest restorable one; leftover temporary
folders are removed when the manager starts. A second manager keeps the best checkpoint by
validation loss.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(directory: str, item_names, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=item_names, options=ocp.CheckpointManagerOptions(
      create=True, cleanup_tmp_directories=True, **options))


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
               keep_best: bool = True):
    root = os.path.abspath(workdir)
    self.directory = os.path.join(root, "checkpoints")
    self.manager = _manager(self.directory, ("state", "data"), max_to_keep=max_to_keep,
                            enable_async_checkpointing=async_save)
    self.best = None
    if keep_best:
      self.best = _manager(os.path.join(root, "best"), ("state", "data"), max_to_keep=1,
                           best_fn=lambda m: m["val_loss"], best_mode="min",
                           enable_async_checkpointing=async_save)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict):
    self.manager.save(step, args=_save_args(state, data_state), force=True)

  def save_if_best(self, step: int, state, data_state: dict, val_loss: float) -> bool:
    """Keeps `state` under <workdir>/best if its validation loss is the lowest so far."""
    if self.best is None or step in self.best.all_steps():
      return False  # A resumed run recomputes a validation it had already kept.
    previous = self.best.best_step()
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
    self.manager.wait_until_finished()

  def close(self):
    for m in (self.manager, self.best):
      if m is not None:
        m.wait_until_finished()
        m.close()


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
