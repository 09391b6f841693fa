"""The .nemo container: a tar read in place, never extracted; unsafe members refuse the file."""

from __future__ import annotations

import os
import re
import tarfile

from dpojax.formats.convert_common import CheckpointError

CONFIG_NAME = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
WEIGHTS_DIR = "model_weights"


# ---------------------------------------------------------------------------------------------
# The container.


class Archive:
  """Read-only view of a .nemo tar (members read in place) or of an extracted .nemo folder."""

  def __init__(self, path: str):
    self.path = path
    self._tar = None
    self._files: dict[str, object] = {}
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        for name in dirs + files:
          full = os.path.join(root, name)
          rel = os.path.relpath(full, path).replace(os.sep, "/")
          if os.path.islink(full):
            raise CheckpointError(f"{path}: refusing link {rel!r}")
          if name in files:
            self._files[rel] = full
      return
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such .nemo file or folder")
    try:
      self._tar = tarfile.open(path, "r:*")  # Plain tar, or gzip for files before NeMo 1.7.
    except (tarfile.TarError, OSError) as e:
      why = "not a plain or gzip tar" if isinstance(e, tarfile.ReadError) else str(e)
      raise CheckpointError(f"{path}: not a .nemo tar file ({why})") from None
    try:
      members = self._tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:  # A .nemo cut short: a partial copy.
      raise CheckpointError(f"{path}: truncated or corrupt .nemo tar file ({e})") from None
    for member in members:
      name = _safe_member_name(path, member)
      if name is None or member.isdir():
        continue
      if name in self._files:
        raise CheckpointError(f"{path}: duplicate tar member {member.name!r}")
      self._files[name] = member

  def names(self) -> list[str]:
    return sorted(self._files)

  def has(self, name: str) -> bool:
    return name in self._files

  def open(self, name: str):
    if name not in self._files:
      raise CheckpointError(f"{self.path}: no member {name!r}")
    if self._tar is None:
      return open(self._files[name], "rb")
    return self._tar.extractfile(self._files[name])

  def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
    with self.open(name) as f:
      f.seek(offset)
      return f.read() if length is None else f.read(length)

  def where(self, name: str) -> str:
    return f"{self.path}/{name}" if self._tar is None else f"{self.path}!{name}"

  def close(self):
    if self._tar is not None:
      self._tar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _safe_member_name(path: str, member: tarfile.TarInfo) -> str | None:
  """The member's name without './', or an error for anything that could escape the target."""
  raw = member.name
  if raw.startswith("/") or raw.startswith("\\") or re.match(r"^[A-Za-z]:", raw):
    raise CheckpointError(f"{path}: refusing tar member {raw!r} (absolute path)")
  parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
  if ".." in parts:
    raise CheckpointError(f"{path}: refusing tar member {raw!r} ('..' component)")
  if member.issym() or member.islnk():
    raise CheckpointError(
        f"{path}: refusing tar member {raw!r} (link to {member.linkname!r})")
  if not (member.isfile() or member.isdir()):
    raise CheckpointError(f"{path}: refusing tar member {raw!r} (not a regular file)")
  return "/".join(parts) or None


def _clean_tarinfo(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
  if info.name == "./out.nemo":
    return None
  info.uid = info.gid = 0
  info.uname = info.gname = ""
  return info
