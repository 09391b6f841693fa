"""The training CLI: a user error is one `error:` line and exit 1; --debug and bugs keep the
traceback. The cases run as concurrent subprocesses (each stops before compiling)."""

import io
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT, TESTDATA, TINY_CONFIG

LEGACY_NEMO = os.path.join(TESTDATA, "stories260k", "nemo", "stories260k-legacy-ckpt.nemo")


def evil_nemo(path):
  """A .nemo whose tar holds a member that would land outside the extraction folder."""
  with tarfile.open(path, "w") as tar:
    data = b"pwned\n"
    info = tarfile.TarInfo("../../evil.txt")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  return path


def truncated_nemo(path):
  with open(LEGACY_NEMO, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:700_000])  # Cut inside model_weights.ckpt, as a partial copy is.
  return path


# name: (extra flags, the exact error line or its start (ending "..."))
CASES = {
    "unknown_key": (["--config.train.foo=1"],
                    "error: --config.train.foo: train has no key 'foo' (its keys: adam_b1, ..."),
    "unknown_section": (["--config.trian.max_steps=1"],
                        "error: --config.trian.max_steps: the config has no key 'trian' ..."),
    "max_steps_0": (["--config.train.max_steps=0"], "error: train.max_steps=0 must be positive"),
    "dtype": (["--config.model.dtype=float8"],
              "error: model.dtype='float8' is not one of ('float32', 'bfloat16', 'float16', "
              "'float64')"),
    "missing_init": (["--config.init.path={tmp}/missing.nemo"],
                     "error: init.path={tmp}/missing.nemo: no such file or folder"),
    "evil_nemo": (["--config.init.path={tmp}/evil.nemo"],
                  "error: {tmp}/evil.nemo: refusing tar member '../../evil.txt' ('..' "
                  "component)"),
    "truncated_nemo": (["--config.init.path={tmp}/cut.nemo"],
                       "error: {tmp}/cut.nemo: truncated or corrupt .nemo tar file (unexpected "
                       "end of data)"),
}
BUG = ("import sys; from absl import app; from dpojax import main; from dpojax.train import loop;"
       " loop.run = lambda *a, **k: {}['a bug']; app.run(main.main, flags_parser=main.parse_flags)")


def error_lines(stderr):
  """stderr without absl's warnings about the data (lines starting W<date>)."""
  return [l for l in stderr.splitlines() if l and not (l[0] == "W" and l[1:5].isdigit())]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("cli"))
  evil_nemo(os.path.join(tmp, "evil.nemo"))
  truncated_nemo(os.path.join(tmp, "cut.nemo"))
  base = [f"--config={TINY_CONFIG}", f"--workdir={tmp}/run"]
  commands = {name: [sys.executable, "-m", "dpojax.main", *base,
                     *(f.format(tmp=tmp) for f in flags)] for name, (flags, _) in CASES.items()}
  commands["debug"] = [*commands["max_steps_0"], "--debug"]
  for i, old in enumerate(("init.from", 'init["from"]')):  # The key's old name, both spellings.
    commands[f"old_key{i}"] = [*commands["missing_init"][:-1],
                               f"--config.{old}={tmp}/missing.nemo"]
  commands["bug"] = [sys.executable, "-c", BUG, *base]
  procs = {name: subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, c in commands.items()}
  out = {}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=600)
    out[name] = (proc.returncode, err)
  return tmp, out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_1(results, name):
  tmp, out = results
  code, err = out[name]
  want = CASES[name][1].format(tmp=tmp)
  assert code == 1, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = error_lines(err)
  assert len(lines) == 1, err[-3000:]
  if want.endswith("..."):
    assert lines[0].startswith(want[:-3]), lines[0]
  else:
    assert lines[0] == want
  assert not os.path.exists(os.path.join(tmp, "evil.txt"))
  assert not os.path.exists(os.path.join(tmp, "run", "checkpoints"))  # Stopped before training.


@pytest.mark.slow
def test_the_old_init_from_spelling_reads_as_init_path(results):
  tmp, out = results
  for name in ("old_key0", "old_key1"):
    code, err = out[name]
    assert code == 1 and error_lines(err) == [
        "WARNING: config key init.from is now init.path",
        f"error: init.path={tmp}/missing.nemo: no such file or folder"], err[-3000:]


@pytest.mark.slow
def test_debug_shows_the_traceback_of_a_user_error(results):
  code, err = results[1]["debug"]
  assert code == 1
  assert "Traceback" in err and "ConfigError: train.max_steps=0 must be positive" in err


@pytest.mark.slow
def test_a_bug_keeps_its_traceback(results):
  code, err = results[1]["bug"]
  assert code == 1
  assert "Traceback" in err and "KeyError: 'a bug'" in err
  assert not any(l.startswith("error:") for l in err.splitlines())


# --- a stop signal while the start-up compiles ---------------------------------------------

# Unrolled layers: the eval step's compilation takes seconds, long enough for the signal to land
# inside it (the start-up line is printed just before the step-0 validation compiles).
SLOW_COMPILE = ["--config.model.num_layers=12", "--config.model.scan_unroll=12",
                "--config.model.hidden_size=64", "--config.model.num_attention_heads=4"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_compilation_and_validation_ends_the_run_at_once(tmp_path, sig):
  """The signal lands while the step-0 validation compiles: the run does not wait for the
  compilation and the validation (no val record is written), exits 0, and says nothing was
  saved; run again, it starts from scratch and trains."""
  import signal as signal_lib  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "dpojax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
         *SLOW_COMPILE]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("Training on "):
      break
  time.sleep(1.0)  # Into the eval step's compilation.
  sent = time.perf_counter()
  proc.send_signal(getattr(signal_lib, sig))
  out, err = proc.communicate(timeout=300)
  elapsed = time.perf_counter() - sent
  print(f"{sig}: exited {elapsed:.2f} s after the signal")
  assert proc.returncode == 0, err[-3000:]
  assert out.splitlines()[-1] == (
      f"Received signal {int(getattr(signal_lib, sig))} before the first step: nothing was "
      "saved yet; run again with the same --workdir to start or resume.")
  records = os.path.join(workdir, "metrics.jsonl")
  assert not os.path.exists(records) or not open(records).read().strip()
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "0"))
