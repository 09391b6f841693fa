"""<workdir>/tensorboard/events.out.tfevents.*: scalars as `split/name`, samples as text.

Written synchronously, each call's events appended whole or not at all (tensorboardX's
SummaryWriter writes from a thread of its own, where a full disk is a traceback we cannot
handle and a half-written record). The records are TensorBoard's own framing (length, masked
CRC-32C, event, CRC) of tensorboardX's Event protos.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from dpojax.tracking import policy
from dpojax.tracking.base import Writer, scalars

FOLDER = "tensorboard"


def frame(event: event_pb2.Event) -> bytes:
  data = event.SerializeToString()
  header = struct.pack("Q", len(data))
  return (header + struct.pack("I", masked_crc32c(header)) + data
          + struct.pack("I", masked_crc32c(data)))


def read_events(path: str) -> list[event_pb2.Event]:
  """The events of one file (for tests and tools; no tensorboard package needed)."""
  events = []
  with open(path, "rb") as f:
    while header := f.read(8):
      (length,) = struct.unpack("Q", header)
      f.read(4)
      events.append(event_pb2.Event.FromString(f.read(length)))
      f.read(4)
  return events


def samples_markdown(samples: list[dict]) -> str:
  """The samples as one markdown table (TensorBoard's text plugin renders it)."""
  columns = [c for c in ("prompt", "policy", "reference", "chosen") if c in samples[0]]
  cell = lambda s: str(s).replace("|", "\\|").replace("\n", "<br>")
  rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  rows += ["| " + " | ".join(cell(s[c]) for c in columns) + " |" for s in samples]
  return "\n".join(rows)


class TensorBoardWriter(Writer):
  what = "TensorBoard events"

  def __init__(self, workdir: str):
    directory = os.path.join(workdir, FOLDER)
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time())}."
                             f"{socket.gethostname()}.{os.getpid()}")
    self._fd = None

  def _append(self, events):
    if self._fd is None:
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if os.fstat(self._fd).st_size == 0:  # The file's first record names its version.
      events = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")] + events
    policy.append(self._fd, b"".join(frame(e) for e in events))

  def write(self, step, split, metrics):
    now = time.time()
    self._append([event_pb2.Event(wall_time=now, step=int(step),
                                  summary=tb_summary.scalar(f"{split}/{k}", v))
                  for k, v in scalars(metrics).items()])

  def write_samples(self, step, samples):
    if samples:
      self._append([event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=tb_summary.text("samples", samples_markdown(samples)))])

  def close(self, step):
    if self._fd is not None:
      os.close(self._fd)
