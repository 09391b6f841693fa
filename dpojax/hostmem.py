"""Keep freed host memory in the process (glibc malloc), so XLA:CPU steps stop faulting.

XLA's CPU runtime allocates every execution's temporaries afresh (one block of about 780 MB for
a step of the issue-10 benchmark model) and frees them after. glibc serves a block that large
with mmap and gives it back with munmap, so each step faults in and zeroes every page again:
16% of a single-core step was kernel time (`perf`), 779 MB mmap/munmap once per step (`strace`).
With mmap off, one arena and no trimming, the freed block is reused by the next step. Call it
first in an entry point, before jax or numpy start threads (arenas are made for threads).
"""

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # From glibc's malloc.h.
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
  """Tell glibc to reuse freed memory; True if it took. A no-op off glibc, or with the
  environment variable DPOJAX_MALLOC=default (the process keeps glibc's own settings)."""
  if os.environ.get("DPOJAX_MALLOC") == "default" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
              mallopt(_M_TRIM_THRESHOLD, _INT_MAX)])
