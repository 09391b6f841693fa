"""<workdir>/tracking/<tracker>.json: what a tracker must remember across a resume (its run id
and the last step it holds), replaced atomically."""

from __future__ import annotations

import json
import os


def load(state_dir: str, name: str) -> dict:
  try:
    with open(os.path.join(state_dir, f"{name}.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def save(state_dir: str, name: str, state: dict):
  os.makedirs(state_dir, exist_ok=True)
  path = os.path.join(state_dir, f"{name}.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(state, f)
  os.replace(tmp, path)
