"""Keep freed host memory in the process (glibc malloc), so XLA:CPU steps stop faulting.

XLA's CPU runtime allocates every execution's temporaries afresh (one block of about 780 MB for
a step of the issue-10 benchmark model) and frees them after. glibc serves a block that large
with mmap and gives it back with munmap, so each step faults in and zeroes every page again:
16% of a single-core step was kernel time (`perf`), 779 MB mmap/munmap once per step (`strace`).
With mmap off, one arena and no trimming, the freed block is reused by the next step. Call it
first in an entry point, before jax or numpy start threads (arenas are made for threads).

That pays for small models only. With every block in the heap, steps whose temporaries differ
in size (length buckets, packed row counts) leave holes that a larger one cannot reuse: at the
135M benchmark shape the process peaked at 9.6 GiB against 6.4 GiB with glibc's defaults, at
the same speed (BUILD.md, issue 34). `fit_to_model` hands large blocks back to mmap again once
the model is known to be that large.
"""

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8  # malloc.h.
_INT_MAX = 2**31 - 1
# glibc's own values; setting any of them freezes its dynamic mmap threshold, so it is set to
# where that threshold grows by itself (32 MiB on 64-bit), and trimming to twice that, as glibc
# does: blocks up to 32 MiB are reused from the heap, larger ones mapped and unmapped.
_MMAP_MAX_DEFAULT, _MMAP_THRESHOLD, _TRIM = 65536, 32 << 20, 64 << 20
# Parameters at which freed blocks go back to the system again: the 3.2M-parameter benchmark
# model steps 20% faster retaining them; the 135M shape gains nothing and grows 50% (3.2 GiB).
LARGE_MODEL_PARAMS = 32_000_000
_retained = False


def _libc():
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


def _mallopt():
  mallopt = getattr(_libc(), "mallopt", None)
  if mallopt is None:
    return None
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return mallopt


def retain_freed_memory() -> bool:
  """Tell glibc to reuse freed memory; True if it took. A no-op off glibc, or with the
  environment variable DPOJAX_MALLOC=default (the process keeps glibc's own settings)."""
  global _retained
  if os.environ.get("DPOJAX_MALLOC") == "default" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = _mallopt()
  if mallopt is None:
    return False
  _retained = all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
                   mallopt(_M_TRIM_THRESHOLD, _INT_MAX)])
  return _retained


def fit_to_model(num_params: int) -> bool:
  """Once the model is known (before its first step): a model of LARGE_MODEL_PARAMS or more
  gets glibc's mmap (blocks over 32 MiB), trimming and arenas back, unless
  DPOJAX_MALLOC=retain.
  True if freed memory is still retained afterwards."""
  global _retained
  if not _retained or num_params < LARGE_MODEL_PARAMS or (
      os.environ.get("DPOJAX_MALLOC") == "retain"):
    return _retained
  mallopt = _mallopt()
  if (mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT) and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
      and mallopt(_M_TRIM_THRESHOLD, _TRIM)
      and mallopt(_M_ARENA_MAX, 8 * (os.cpu_count() or 1))):  # glibc's default count.
    _retained = False
    _libc().malloc_trim(0)  # What a pretrained load freed into the heap.
  return _retained
