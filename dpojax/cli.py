"""The command-line tools' error handling: a user error is one `error: ...` line, exit status 1.

  def main(argv=None) -> int:
    return cli.run(_main, argv)   # _main(argv) parses (with cli.add_debug_flag) and works.

User errors are the project's ValueErrors (CheckpointError, DataError, ConfigError,
WorkdirError, ...) and OSErrors (a missing or unreadable file); their messages name the
file, line or key. `--debug` shows the traceback instead; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

USER_ERRORS = (ValueError, OSError)
DEBUG_FLAG = "--debug"


def add_debug_flag(parser: argparse.ArgumentParser):
  parser.add_argument(DEBUG_FLAG, action="store_true",
                      help="on an error, show the Python traceback (not just one line)")


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
  """main(argv)'s int result (0 for any other), or 1 after one `error: ...` line on stderr."""
  argv = list(sys.argv[1:] if argv is None else argv)
  # argparse reads `--debug` as the flag wherever it stands before `--`, never as a value.
  debug = DEBUG_FLAG in (argv[:argv.index("--")] if "--" in argv else argv)
  try:
    rc = main(argv)
  except USER_ERRORS as e:
    if debug:
      raise
    # One line, even for a library's message over several (e.g. tarfile's, per method).
    print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    if debug:
      raise
    print("error: interrupted", file=sys.stderr)
    return 130
  return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
