"""The README's `python -m dpojax...` command lines, run as written (plus tiny overrides).

Each fenced bash block's commands are joined across `\\` continuations and split at `&&`;
those that start with `python -m dpojax` run from the repository root, with /tmp paths moved
under pytest's tmp_path, files a clean checkout lacks (a user's my_pairs.jsonl, an
sft_model.nemo) given as fixtures, and overrides appended that shrink the model and the run.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TESTDATA

README = os.path.join(ROOT, "README.md")
TOY_TRAIN = os.path.join(ROOT, "dpojax", "assets", "toy_prefs_train.jsonl")
NEMO = os.path.join(TESTDATA, "stories260k", "nemo", "stories260k-mcore-torch_dist.nemo")
# Appended, so they win over the command's own values (absl applies overrides in order).
TINY = ["--config.train.max_steps=2", "--config.eval.max_batches=1",
        "--config.train.peak_flops=-1", "--config.model.hidden_size=32",
        "--config.model.num_layers=1", "--config.model.ffn_hidden_size=64",
        "--config.checkpoint.async_save=False"]


def readme_commands(text: str) -> list[str]:
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
      for part in line.split("&&"):
        if part.strip().startswith("python -m dpojax"):
          commands.append(part.strip())
  return commands


def test_readme_commands_are_found():
  commands = readme_commands(open(README).read())
  assert len(commands) >= 5, commands
  assert commands[0] == ("python -m dpojax.main --config=configs/dpo_gpt.py "
                         "--workdir=/tmp/dpojax_quickstart")
  assert any("--config.init.path=sft_model.nemo" in c for c in commands)
  assert not any("init.from" in c for c in commands)  # ml_collections cannot parse it.


def _fixtures(tmp_path) -> dict:
  """Stand-ins for the files the README's commands name that a checkout does not have."""
  lines = open(TOY_TRAIN).read().splitlines()
  paths = {}
  for name, chunk in (("my_pairs.jsonl", lines[:64]), ("my_val.jsonl", lines[64:80]),
                      ("train.jsonl", lines[:32]), ("val.jsonl", lines[32:48])):
    paths[name] = tmp_path / name
    paths[name].write_text("\n".join(chunk) + "\n")
  paths["sft_model.nemo"] = tmp_path / "sft_model.nemo"
  shutil.copy(NEMO, paths["sft_model.nemo"])
  return {k: str(v) for k, v in paths.items()}


def _as_run(command: str, tmp: str, fixtures: dict) -> tuple[list[str], dict]:
  args = shlex.split(command)
  assert args[:3] == ["python", "-m", "dpojax.main"], command
  out, paths = [sys.executable] + args[1:], {}
  for i, arg in enumerate(out):
    key, _, value = arg.partition("=")
    if value.startswith("/tmp/"):
      paths[key] = value = os.path.join(tmp, value[len("/tmp/"):])
    elif value in fixtures:
      value = fixtures[value]
    out[i] = f"{key}={value}" if _ else arg
  # The nemo template's markers are text to the checkpoint's 512-piece tokenizer: longer rows.
  longer = ["--config.data.max_seq_length=192"] if "template=nemo" in command else []
  return out + TINY + longer, paths


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
  fixtures = _fixtures(tmp_path)
  commands = readme_commands(open(README).read())
  env = dict(os.environ, PYTHONPATH=ROOT)  # This checkout's dpojax, whatever is installed.
  for i, command in enumerate(commands):  # Each its own /tmp: a fresh workdir every time.
    argv, paths = _as_run(command, str(tmp_path / f"tmp{i}"), fixtures)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
    workdir = paths["--workdir"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(l) for l in f]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2], command
    assert "WARNING: data.train_path" not in proc.stdout, command  # val_path given with it.
    if "--config.export.to" in paths:
      assert os.path.isfile(paths["--config.export.to"]), command
    if "--config.train.lr_schedule=linear" in command:  # TRL's: 1e-6, no warmup, to 0 at 2.
      assert train[0]["learning_rate"] == pytest.approx(0.5e-6, rel=1e-5)
      with open(os.path.join(workdir, "run_config.json")) as f:
        assert json.load(f)["data"]["shuffle"] is False
