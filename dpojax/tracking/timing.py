"""Where a run's time and memory go, as metrics.

Train records: `step_time` (seconds per step: waiting for data + compute, never evaluation,
checkpoints or samples), `data_time` and `compute_time` (its two parts, per step),
`checkpoint_time` (seconds saving checkpoints since the previous train record), and the peak
memory so far (`peak_device_memory_gb` where the backend reports it, else `peak_host_rss_gb`).
Val records: `eval_time` and, with eval.num_samples, `sample_time` (that evaluation's).
The throughput figures (pairs_per_s, tokens_per_s, model_flops_per_s, mfu) divide by the
step time, so an evaluation never lowers them.
"""

from __future__ import annotations

import contextlib
import resource
import time

import jax

from dpojax.train import compiled

PHASES = ("data", "compute", "checkpoint", "eval", "samples")


class PhaseTimer:
  """Seconds per phase since the last `take` of that phase."""

  def __init__(self):
    self.totals = dict.fromkeys(PHASES, 0.0)

  @contextlib.contextmanager
  def phase(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.totals[name] += time.perf_counter() - start

  def take(self, *names: str) -> dict[str, float]:
    out = {n: self.totals[n] for n in names}
    for n in names:
      self.totals[n] = 0.0
    return out

  def train_record(self, steps: int) -> dict[str, float]:
    t = self.take("data", "compute", "checkpoint")
    steps = max(steps, 1)
    return {"step_time": (t["data"] + t["compute"]) / steps, "data_time": t["data"] / steps,
            "compute_time": t["compute"] / steps, "checkpoint_time": t["checkpoint"]}


def memory_metrics() -> dict[str, float]:
  """The peak memory so far: the devices' (memory_stats), else this process's RSS."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-exception-caught (backends without it)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  if peaks:
    return {"peak_device_memory_gb": max(peaks) / 2**30}
  return {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


def mfu_peak(peak_flops: float, dtype: str, say) -> float:
  """The MFU denominator (FLOP/s of all devices), or <= 0 for no MFU.

  train.peak_flops > 0 is used as given; -1 turns MFU off; 0 times a matmul at start-up on
  an accelerator. On CPU (0) there is no MFU: a start-up matmul timing on a shared, loaded
  CPU is no peak (it gave MFU > 1), so set train.peak_flops to report one.
  """
  if peak_flops > 0:
    say(f"MFU divides by train.peak_flops={peak_flops:.4g} FLOP/s")
    return peak_flops
  if peak_flops < 0:
    return -1.0
  if jax.default_backend() == "cpu":
    say("MFU: not reported on CPU (no fixed peak); set train.peak_flops=FLOP/s to report it")
    return -1.0
  # The run's FLOP/s count every process's tokens: the peak is that of all devices.
  peak = compiled.matmul_peak_flops(dtype=dtype) * jax.device_count()
  say(f"MFU divides by {peak:.4g} FLOP/s: the best {dtype} matmul timed at start-up, times "
      f"{jax.device_count()} device(s) (train.peak_flops sets it); an interval faster than "
      "that raises it, so MFU stays <= 1")
  return peak
