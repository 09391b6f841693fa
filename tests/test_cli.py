"""dpojax.cli: a user error is one `error: ...` line and exit status 1; --debug keeps the trace."""

import os
import subprocess
import sys

import pytest

from dpojax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fails_with(exc):
  def main(argv):
    del argv
    raise exc
  return main


def test_user_errors_print_one_line_and_return_1(capsys):
  cases = [(ValueError("a.jsonl:3: field 'prompt': expected a string"),
            "error: a.jsonl:3: field 'prompt': expected a string\n"),
           (FileNotFoundError(2, "No such file or directory", "m.nemo"),
            "error: [Errno 2] No such file or directory: 'm.nemo'\n"),
           (ValueError("x.nemo: could not be opened:\n- method gz: no\n- method tar: no"),
            "error: x.nemo: could not be opened: - method gz: no - method tar: no\n"),
           (ValueError(), "error: ValueError\n")]
  for exc, want in cases:
    assert cli.run(fails_with(exc), ["--x", "1"]) == 1
    assert capsys.readouterr() == ("", want)
  assert cli.run(fails_with(KeyboardInterrupt()), []) == 130
  assert capsys.readouterr().err == "error: interrupted\n"


def test_debug_flag_and_bugs_keep_the_traceback():
  with pytest.raises(ValueError, match="bad"):
    cli.run(fails_with(ValueError("bad")), ["--in", "x", "--debug"])
  with pytest.raises(TypeError):  # Not a user error: a bug shows where it is.
    cli.run(fails_with(TypeError("bug")), [])
  # After `--`, "--debug" is a positional value, not the flag.
  assert cli.run(fails_with(ValueError("bad")), ["--", "--debug"]) == 1


def test_exit_status_of_main():
  assert cli.run(lambda argv: 3, []) == 3
  assert cli.run(lambda argv: {"rows": 2}, []) == 0  # pack.main returns its statistics.
  seen = []
  cli.run(seen.append, ["a", "--debug"])
  assert seen == [["a", "--debug"]]


def run_module(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)


@pytest.mark.parametrize("module,args,message", [
    ("dpojax.plot", ["{tmp}/nowhere"],
     "error: {tmp}/nowhere/metrics.jsonl: no metrics file (is {tmp}/nowhere a dpojax "
     "workdir?)\n"),
    ("dpojax.pack", ["--input", "x.jsonl", "--output", "{tmp}", "--pack_size", "8",
                     "--tokenizer_path", "t.model"],
     "error: {tmp}: exists (pass --overwrite to replace it)\n"),
])
def test_python_dash_m_prints_one_line_unless_debug(module, args, message, tmp_path):
  args = [a.format(tmp=tmp_path) for a in args]
  r = run_module(module, *args)
  assert (r.returncode, r.stdout, r.stderr) == (1, "", message.format(tmp=tmp_path))
  r = run_module(module, *args, "--debug")
  assert r.returncode == 1 and r.stderr.startswith("Traceback (most recent call last):")
  assert r.stderr.rstrip().endswith(message.format(tmp=tmp_path)[len("error: "):].rstrip())
