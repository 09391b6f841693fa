"""Every script in scripts/ runs, at a tiny size, as a user runs it (a subprocess from the repo
root), and what it prints is checked. byo_example.py runs in test_chat_model's README
walkthrough; benchmarks/ have their own tests."""

import ast
import gzip
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "dpojax", "assets")
HH_SLICE = os.path.join(ROOT, "tests", "testdata", "hh-rlhf", "harmless-base-test-slice.jsonl.gz")
HH_SLICE_INVALID = 2  # Lines 87 (empty chosen) and 101 (prompts differ): SOURCE.md there.
STORIES_HF = os.path.join(ROOT, "tests", "testdata", "stories260k", "hf")
TOY_TOKENIZER = os.path.join(ASSETS, "tokenizer.model")
TOY_VAL = os.path.join(ASSETS, "toy_prefs_val.jsonl")


def run_script(name, *args, env=None, expect_rc=0, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **(env or {}))
  proc = subprocess.run([sys.executable, os.path.join("scripts", name), *map(str, args)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == expect_rc, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
  return proc.stdout


def line_count(path):
  with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
    return sum(1 for _ in f)


# make_toy_prefs.py


def test_make_toy_prefs_regenerates_the_shipped_assets_bit_for_bit(tmp_path):
  out = tmp_path / "assets"
  run_script("make_toy_prefs.py", "--out", out)
  names = ("toy_prefs_train.jsonl", "toy_prefs_val.jsonl", "tokenizer.model")
  assert sorted(os.listdir(out)) == sorted(names)  # No tokenizer.vocab or other leftovers.
  for name in names:
    with open(out / name, "rb") as got, open(os.path.join(ASSETS, name), "rb") as want:
      assert got.read() == want.read(), name
  assert line_count(str(out / "toy_prefs_train.jsonl")) == 2000
  assert line_count(str(out / "toy_prefs_val.jsonl")) == 200


# structure.py


def parse_structure(stdout):
  fields = dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)
  modules, lines = re.fullmatch(r"(\d+)  lines: (\d+)", fields["modules"]).groups()
  return {"modules": int(modules), "lines": int(lines),
          "long": fields["modules over 450 lines"].strip(),
          "cycles": ast.literal_eval(fields["import cycles (module-level)"]),
          "all_cycles": ast.literal_eval(fields["import cycles (counting function-local imports)"]),
          "local": next(v for k, v in fields.items()
                        if k.startswith("function-local imports")).strip(),
          "errors": fields["config error types"].strip(),
          "branches": int(fields["lines that branch on the reference mode"]),
          "failed": fields.get("failed")}


def test_structure_passes_on_the_package():
  got = parse_structure(run_script("structure.py"))
  package = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "dpojax"))
             for f in fs if f.endswith(".py")]
  assert got["modules"] == len(package)
  assert got["lines"] == sum(len(open(p, encoding="utf-8").read().splitlines()) for p in package)
  assert (got["long"], got["cycles"], got["all_cycles"], got["local"]) == ("0", 0, 0, "0")
  assert got["errors"] == "1 dpojax.errors.ConfigError"
  assert got["failed"] is None


def test_structure_finds_each_kind_of_breach(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  files = {
      "__init__.py": "",
      "a.py": "from pkg import b\n",
      "b.py": "import pkg.a\n",  # a <-> b at module level.
      "c.py": ("def f():\n  import json\n\n\ndef g():\n  import torch  # optional: not counted\n"
               "\n\nclass FooConfigError(Exception):\n  pass\n\n\n"
               "def h(mode):\n  return mode == 'copy'\n"),
      "d.py": "x = 1\n" * 451,
      "e.py": "def f():\n  from pkg import g\n",  # e <-> g only through a function-local import.
      "g.py": "from pkg import e\n",
  }
  for name, src in files.items():
    (pkg / name).write_text(src)
  got = parse_structure(run_script("structure.py", pkg, expect_rc=1))
  assert got["modules"] == len(files)
  assert got["lines"] == sum(len(src.splitlines()) for src in files.values())
  assert got["long"] == "1 pkg.d (451)"
  assert got["cycles"] == [["pkg.a", "pkg.b"]]
  assert sorted(got["all_cycles"]) == [["pkg.a", "pkg.b"], ["pkg.e", "pkg.g"]]
  assert got["local"] in ("2 pkg.c 1, pkg.e 1", "2 pkg.e 1, pkg.c 1")
  assert got["errors"] == "1 pkg.c.FooConfigError"
  assert got["branches"] == 1
  assert got["failed"] == "modules too long, import cycles, function-local imports"


# boundary_counts.py


def test_boundary_counts_on_hh_and_toy_data():
  out = run_script("boundary_counts.py", "--data", HH_SLICE, TOY_VAL,
                   "--tokenizer", TOY_TOKENIZER, os.path.join(STORIES_HF, "tokenizer.model"))
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
          if line.startswith("| ") and not line.startswith("| data")]
  assert len(rows) == 4  # 2 data files x 2 tokenizers.
  for data, _, pairs, apart, joint, straddled in rows:
    pairs, apart, joint, straddled = map(int, (pairs, apart, joint, straddled))
    want_pairs = (line_count(HH_SLICE) - HH_SLICE_INVALID if "hh-rlhf" in data
                  else line_count(TOY_VAL))
    assert pairs == want_pairs, data
    # joint falls back to apart exactly on straddled pairs, where the prompt's ids are not a
    # prefix of the whole text's, so those (and only those) differ from encode(whole).
    assert joint == straddled <= apart <= pairs
    if "toy_prefs" in data:
      # The toy response follows its prompt with no space: encoded alone it gets
      # SentencePiece's "▁" dummy prefix, which the whole text has not there.
      assert apart == pairs


# hh_boundary.py


def hh_boundary(path):
  out = json.loads(run_script("hh_boundary.py", path))
  assert out["pairs"] + out["invalid"] == line_count(str(path))
  assert out["invalid"] == HH_SLICE_INVALID
  for template in ("chatml", "none (HH text)"):
    assert len(out[template]) == 3
    for counts in out[template].values():
      # A straddled pair's prompt ids are not a prefix of the whole's: it differs when split.
      assert 0 <= counts["straddles"] <= counts["split_differs"] <= out["pairs"]
  return out


def test_hh_boundary_on_the_slice_and_with_the_boundary_space_moved(tmp_path):
  stories = "stories260K tokenizer.json (512, Metaspace)"
  out = hh_boundary(HH_SLICE)
  # HH responses start with a space, which Metaspace turns into the "▁" it would prepend.
  assert out["chatml"][stories]["split_differs"] == 0
  assert out["none (HH text)"][stories]["split_differs"] == 0
  # The same dialogues with no space after the last "Assistant:": a response encoded alone
  # now gets a "▁" that the whole text has not, so every pair differs when split.
  moved = tmp_path / "no-space.jsonl"
  with gzip.open(HH_SLICE, "rt") as f, open(moved, "w") as g:
    for line in f:
      record = json.loads(line)
      for side in ("chosen", "rejected"):
        head, sep, tail = record[side].rpartition("\n\nAssistant: ")
        record[side] = head + "\n\nAssistant:" + tail if sep else record[side]
      g.write(json.dumps(record) + "\n")
  out = hh_boundary(moved)
  assert out["chatml"][stories]["split_differs"] == out["pairs"]
  assert out["none (HH text)"][stories]["split_differs"] == out["pairs"]


# hf_fp32_floor.py


@pytest.mark.slow
def test_hf_fp32_floor_two_depths():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = run_script("hf_fp32_floor.py", "--depths", 1, 2)
  rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
  assert [int(r[0]) for r in rows] == [1, 2]
  with open(os.path.join(STORIES_HF, "config.json")) as f:
    hf_cfg = json.load(f)
  with open(os.path.join(ROOT, "tests", "testdata", "stories260k", "reference.json")) as f:
    row_len = 1 + len(json.load(f)["greedy_ids"])  # The script's rows: BOS + greedy ids.
  for depth, *diffs, scale in ([int(r[0])] + [float(x) for x in r[1:]] for r in rows):
    cfg = types.SimpleNamespace(
        num_layers=depth, hidden_size=hf_cfg["hidden_size"],
        ffn_hidden_size=hf_cfg["intermediate_size"], vocab_size=hf_cfg["vocab_size"])
    # Two fp32 forwards (or one against fp64) of the same logits, each a chain of sums of
    # about chain_length terms of size up to max|logit|.
    bound = tolerance.sum_tolerance(tolerance.chain_length(cfg, row_len), scale)
    assert all(d <= bound for d in diffs), (depth, diffs, bound)
    assert diffs[2] > 0  # HF fp32 vs fp64: the two precisions were really run.
    assert scale > 1.0


# check_family_sharding.py


@pytest.mark.slow
def test_check_family_sharding_one_mesh_two_steps():
  out = run_script("check_family_sharding.py", "--steps", 2, "--meshes", "2,2,2",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  tol = 1e-5  # The script's stated tolerance (its docstring and TOLERANCE).
  update = float(re.search(r"largest parameter update \(one device\) (\S+)", out).group(1))
  # Step 1 has learning rate 0 (warmup); step 2's Adam update moves parameters by about its
  # learning rate (5e-4 here), far beyond the tolerance, so the comparison below can fail.
  assert update > 10 * tol
  m = re.search(r"\(2, 2, 2\) losses (\[.*?\]) (\[.*?\]) max param diff (\S+)", out)
  single, sharded = ast.literal_eval(m.group(1)), ast.literal_eval(m.group(2))
  assert len(single) == len(sharded) == 2
  assert float(m.group(3)) < tol
  np.testing.assert_allclose(sharded, single, rtol=tol)
