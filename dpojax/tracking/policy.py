"""A write the storage refused (disk full, file too large, permissions), for every writer of a
run (checkpoints, best/, metrics.jsonl, TensorBoard, curves.png, run_config.json), handled
under one policy, checkpoint.on_error:

  stop      one line naming what failed, its step and the last *complete* checkpoint (a
            folder Orbax renamed from N.orbax-checkpoint-tmp to N), then WriteError
            (main.py prints it as `error: ...`, exit 1).
  continue  the same line as a WARNING, once per failure; training goes on.

`storage_reason` tells such a refusal from a bug (which keeps its traceback).
"""

from __future__ import annotations

import errno
import os
import re


class WriteError(RuntimeError):
  """The storage refused a write of the run and checkpoint.on_error=stop."""


# Tensorstore reports a failed write as ValueError("RESOURCE_EXHAUSTED: Error writing ... No
# space left on device [os_error_code='28']"); EFBIG comes as OUT_OF_RANGE, EACCES as
# PERMISSION_DENIED. Orbax re-raises it from its save threads, sometimes wrapped.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_STORAGE_STATUS = ("RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "PERMISSION_DENIED", "DATA_LOSS",
                   "UNAVAILABLE")


def storage_reason(error: BaseException) -> str | None:
  """A short reason ('No space left on device') if `error` (or what it wraps) is the storage
  refusing a write; None for anything else."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and (error.errno or error.strerror):
      return error.strerror or os.strerror(error.errno)
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code:
      number = int(code.group(1))
      return f"{os.strerror(number)} ({errno.errorcode.get(number, number)})"
    if text.startswith(_STORAGE_STATUS):
      return text.splitlines()[0][:200]
    error = error.__cause__ or error.__context__
  return None


def last_complete_step(directory: str) -> int | None:
  """The newest complete checkpoint under `directory`: Orbax writes a step into
  N.orbax-checkpoint-tmp and renames it N once every file is written, so a step in flight
  (or one whose write failed) is never named."""
  try:
    return max((int(n) for n in os.listdir(directory) if n.isdigit()), default=None)
  except OSError:
    return None


def describe_last(directory: str) -> str:
  step = last_complete_step(directory)
  return (f"the last complete checkpoint is step {step} in {directory}" if step is not None
          else "no checkpoint has been written yet")


def refused(what: str, step: int, where: str, reason: str, checkpoints: str, on_error: str,
            say, error_type=WriteError):
  """Applies checkpoint.on_error to a refused write of `what` at `step` into `where`."""
  message = (f"{what} of step {step} could not be written to {where} ({reason}); "
             f"{describe_last(checkpoints)}")
  if on_error == "continue":
    say(f"WARNING: {message}; continuing (checkpoint.on_error=continue)")
    return
  raise error_type(message + "; stopping (checkpoint.on_error=stop)")


def append(fd: int, data: bytes):
  """Appends `data` to the file `fd` (opened O_APPEND) whole or not at all: a refused write
  is cut back off, so a full disk never leaves half a record behind."""
  size = os.fstat(fd).st_size
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
  except OSError:
    try:
      os.ftruncate(fd, size)
    except OSError:
      pass
    raise
