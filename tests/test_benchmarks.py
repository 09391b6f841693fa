"""Every script in benchmarks/ runs, at a tiny size (smoke: no timing is asserted, only that
each finishes and prints the lines its readers look for)."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

HH_SLICE = os.path.join(ROOT, "tests", "testdata", "hh-rlhf", "harmless-base-test-slice.jsonl.gz")
TOY_TOKENIZER = os.path.join(ROOT, "dpojax", "assets", "tokenizer.model")
HH = [f"--hh_path={HH_SLICE}", f"--hh_tokenizer={TOY_TOKENIZER}"]

# Script -> (arguments, a string its output must hold). One entry per benchmarks/*.py.
RUNS = {
    "attention.py": (["--rows=1", "--seq=64", "--blocks=0,32", "--repeats=1"], "block"),
    "attention_layer.py": (["--repeats=1"], "forward+backward"),
    "dot_layouts.py": (["--repeats=2"], "mk,nk:"),
    "gpu_check.py": (["--small", "--impls=xla,chunked"], "attention"),
    "logprob.py": (["--shapes=64x32x100", "--masked_in=0.5", "--runs=1", "--impls=xla,chunked"],
                   "chunked"),
    "packing.py": (["--pairs=2000", "--repeats=1"], "first_fit_decreasing"),
    "reference_modes.py": (["--pairs=2", "--micro_pairs=2", "--seq=32", "--prompt=8",
                            "--steps=1", "--warmup=1", "--modes=copy,none"], "copy"),
    "train_throughput.py": (["--model=tiny", "--pairs=2", "--micro_pairs=2", "--seq=32",
                             "--prompt=8", "--steps=1", "--warmup=1"], "fixed 32:"),
    "trl_throughput.py": (["--model=tiny", "--pairs=2", "--seq=16", "--prompt=4", "--steps=1",
                           "--warmup=1"], "trl fastest: gradient_checkpointing="),
}
NOT_PYTHON_SCRIPTS = {"common.py"}  # Imported by the others (they exercise it).
# Smoke-run beside the code they measure.
TESTED_ELSEWHERE = {"context_memory.py": "tests/test_context.py",
                    "moe_layer.py": "tests/test_grouped.py"}


def run(script, args, timeout=600):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")]))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def test_every_script_has_a_smoke_run():
  scripts = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))}
  assert scripts - NOT_PYTHON_SCRIPTS == set(RUNS) | set(TESTED_ELSEWHERE)
  for script, test in TESTED_ELSEWHERE.items():
    with open(os.path.join(ROOT, test)) as f:
      assert f"benchmarks/{script}" in f.read(), (script, test)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_script_runs_tiny(script):
  if script == "trl_throughput.py" and importlib.util.find_spec("trl") is None:
    pytest.skip("trl not installed (pip install -e .[test] installs trl==1.16.0)")
  args, expect = RUNS[script]
  assert expect in run(script, args)


@pytest.mark.slow
def test_hh_layouts_and_trl_on_the_same_pairs(tmp_path):
  """train_throughput.py --data=hh in the new layouts, and TRL on the very pairs it dumps."""
  out = run("train_throughput.py", ["--model=tiny", "--data=hh", "--hh_max_len=512",
                                    "--pairs=2", "--micro_pairs=2", "--steps=1", "--warmup=0",
                                    "--hh_layouts=buckets,batch_shared", *HH])
  assert "hh buckets:" in out and "hh batch_shared:" in out and "peak_rss_gib=" in out
  if importlib.util.find_spec("trl") is None:
    pytest.skip("trl not installed (pip install -e .[test] installs trl==1.16.0)")
  pairs = tmp_path / "pairs.jsonl"
  run("train_throughput.py", ["--data=hh", "--hh_max_len=512", f"--hh_dump={pairs}", *HH])
  out = run("trl_throughput.py", ["--model=tiny", "--data=hh", f"--hh_pairs={pairs}",
                                  "--pairs=2", "--steps=1", "--warmup=1",
                                  "--gradient_checkpointing=off"])
  assert "trl hh (gradient_checkpointing off):" in out
