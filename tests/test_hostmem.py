"""hostmem: after retain_freed_memory a freed large block is reused without page faults."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# Allocates, frees and reallocates a 64 MiB zero-filled block; prints whether the tuning took
# and the minor page faults of the second allocation (16384 when its pages come fresh).
_PROBE = """
import resource
from dpojax import hostmem
took = hostmem.retain_freed_memory()
block = bytearray(64 << 20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(64 << 20)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env):
  out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env},
                       capture_output=True, text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


def test_freed_block_is_reused_without_faults():
  took, faults = _probe()
  assert took
  assert faults < 1000, faults


def test_opt_out_keeps_glibc_defaults():
  took, faults = _probe(DPOJAX_MALLOC="default")
  assert not took
  assert faults > 10000, faults  # The probe sees glibc's mmap round trip.
