"""Command line: python -m dpojax.main --config=configs/dpo_gpt.py --workdir=DIR.

A user error (bad config value, data, checkpoint, workdir, a checkpoint the disk refused) is
one `error: ...` line on stderr and exit 1; `--debug` shows its traceback. Anything else is a
bug and keeps its traceback.
"""

# pylint: disable=wrong-import-position
import signal

# SIGTERM/SIGINT from here on are recorded, not fatal: a signal during the imports and start-up
# below ends the run cleanly (exit 0) at the next stage. The loop's StopRequested takes over.
# (Before this line, in the interpreter's own start-up or a shell shim that execs it, the
# default action applies: exit 143.)
_EARLY = []
signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY.append(signum))
signal.signal(signal.SIGINT, lambda signum, frame: _EARLY.append(signum))

from dpojax import hostmem

hostmem.retain_freed_memory()  # Before any import starts threads.

import os
import re
import sys


from absl import app, flags, logging
from ml_collections import config_flags

from dpojax import errors, workdir
from dpojax.formats import convert_common
from dpojax.checkpoint import orbax as orbax_ckpt
from dpojax.data import sources
from dpojax.tracking import policy
from dpojax.train import loop, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics and checkpoints go.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
flags.mark_flags_as_required(["config", "workdir"])

# The package's user errors: each message already names the key, file or step.
USER_ERRORS = (errors.ConfigError, sources.DataError, workdir.WorkdirError,
               convert_common.CheckpointError, orbax_ckpt.CheckpointWriteError,
               loop.NonFiniteError, policy.WriteError)


def fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def _missing_override(argv) -> str | None:
  """The first --config.a.b=... whose key the loaded config lacks, as a message."""
  config = None
  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if paths:  # The flag failed before it kept the config: load it again to look.
    try:
      config = workdir.load_config_file(paths[-1])
    except Exception:  # pylint: disable=broad-exception-caught (the flag's error says why)
      return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, parts = config, re.findall(r'\["(\w+)"\]|([^.\[\]]+)', path)
    parts = [a or b for a, b in parts]
    for depth, part in enumerate(parts):
      if node is None or not hasattr(node, "keys") or part not in node:
        section = ".".join(parts[:depth]) or "the config"
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"--config.{'.'.join(parts)}: {section} has no key {part!r}"
                + (f" (its keys: {', '.join(keys)})" if keys else ""))
      node = node[part]
  return None


RENAMED = {"init.from": "init.path"}  # Old key -> new key, for commands written before.


def _renamed(arg: str) -> str:
  """--config.init.from=X (which ml_collections cannot parse: `from` is a Python keyword) and
  --config.init["from"]=X as --config.init.path=X, with one warning line."""
  if not arg.startswith("--config.") or "=" not in arg:
    return arg
  path, value = arg[len("--config."):].split("=", 1)
  key = re.sub(r'\["(\w+)"\]', r".\1", path)
  if key not in RENAMED:
    return arg
  print(f"WARNING: config key {key} is now {RENAMED[key]}", file=sys.stderr, flush=True)
  return f"--config.{RENAMED[key]}={value}"


def parse_flags(argv):
  """absl's parsing, with a bad flag or config override as one line (no traceback)."""
  argv = [argv[0]] + [_renamed(a) for a in argv[1:]]
  sys.argv[:] = argv  # ml_collections reads its overrides from sys.argv.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (see --helpfull)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides.
    if "--debug" in argv or "--debug=true" in argv:
      raise
    fail(_missing_override(argv) or f"bad --config override: {e}")


def main(argv):
  del argv
  # Orbax and Grain log every step at INFO; our own progress lines are printed.
  logging.set_verbosity(logging.WARNING)
  if not _DEBUG.value:
    orbax_ckpt.quiet_background_errors()  # A failed write is reported once, below.
  stop = loop.StopRequested()
  with stop:
    if _EARLY:
      stop.signal = _EARLY[0]
    try:
      sharding.maybe_initialize_distributed(_CONFIG.value.distributed)
      result = loop.run(_CONFIG.value, _WORKDIR.value, stop=stop)
    except USER_ERRORS as e:
      if _DEBUG.value:
        raise
      fail(str(e))
  if result.get("abandoned"):
    # A compilation or the step-0 validation is still running on its thread: leave it,
    # without the interpreter's shutdown waiting on it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
