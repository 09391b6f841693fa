"""hostmem: after retain_freed_memory a freed large block is reused without page faults."""

import os
import platform
import subprocess
import sys

import pytest

from dpojax import hostmem

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# Allocates, frees and reallocates a 64 MiB zero-filled block; prints whether the tuning took
# and the minor page faults of the second allocation (16384 when its pages come fresh).
_PROBE = """
import resource
from dpojax import hostmem
took = hostmem.retain_freed_memory()
if PARAMS:
  took = hostmem.fit_to_model(PARAMS)
block = bytearray(64 << 20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(64 << 20)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(params=0, **env):
  out = subprocess.run([sys.executable, "-c", f"PARAMS = {params}\n" + _PROBE], env={**os.environ, **env},
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


def test_a_small_model_keeps_retaining():
  took, faults = _probe(params=hostmem.LARGE_MODEL_PARAMS - 1)
  assert took
  assert faults < 1000, faults


def test_a_large_model_hands_large_blocks_back():
  """Retaining every block grows a large model's process by holes (BUILD.md, issue 34)."""
  took, faults = _probe(params=hostmem.LARGE_MODEL_PARAMS)
  assert not took
  assert faults > 10000, faults
  took, faults = _probe(params=hostmem.LARGE_MODEL_PARAMS, DPOJAX_MALLOC="retain")
  assert took and faults < 1000, faults
