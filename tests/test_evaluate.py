"""`python -m dpojax.evaluate` on a tiny trained workdir: the numbers the loop's own validation
wrote, and the policy-equals-reference values (loss ln 2, zero margins)."""

import json
import math
import os

import pytest

from dpojax import evaluate as evaluate_lib
from dpojax import pretrained
from dpojax.train import loop

from conftest import tiny_config

KEYS = ("loss", "accuracy", "rewards_chosen_mean", "rewards_rejected_mean",
        "rewards_margin_mean", "logps_chosen_mean", "logps_rejected_mean", "num_pairs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """tiny_config's run (as test_train's); validation at step 3 covers 2 batches of 8 pairs =
  the val file's first 16 pairs, and checkpoints/3 holds that step's policy."""
  path = str(tmp_path_factory.mktemp("run"))
  config = tiny_config()
  loop.run(config, path)  # It writes the run's config.json (read by workdir.find_config).
  with open(os.path.join(path, "metrics.jsonl")) as f:
    (val,) = [r for r in map(json.loads, f) if r["split"] == "val" and r["step"] == 3]
  pairs = str(tmp_path_factory.mktemp("data") / "val16.jsonl")
  with open(config.data.val_path) as src, open(pairs, "w") as dst:
    dst.writelines(src.readlines()[:16])
  return path, val, pairs


@pytest.mark.slow
def test_cli_reproduces_the_runs_validation(trained, tmp_path, capsys):
  """Batches of 3 pairs (not the loop's 8) over the same 16 pairs give the same means."""
  path, val, pairs = trained
  out = tmp_path / "metrics.json"
  argv = ["--checkpoint", os.path.join(path, "checkpoints", "3"), "--data", pairs,
          "--batch_size", "3", "--output", str(out)]
  assert evaluate_lib.main(argv) == 0
  got = json.loads(out.read_text())
  for k in KEYS:
    assert got[k] == pytest.approx(val[k], rel=1e-5, abs=1e-6), k
  assert got["num_pairs"] == 16 and got["dropped"] == 0
  assert 0 < got["accuracy"] < 1 or got["rewards_margin_mean"] != 0  # It trained.
  printed = capsys.readouterr().out
  assert f"accuracy               {got['accuracy']:.6g}" in printed.splitlines()[1]


def test_policy_against_itself_is_ln2(trained):
  path, _, pairs = trained
  policy = pretrained.load_policy(path)
  m = evaluate_lib.evaluate(policy.run_config, policy.params, policy.params, pairs, batch_size=8,
                            max_seq_length=40)
  assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert m["accuracy"] == 0 and m["rewards_margin_mean"] == 0
  # max_seq_length=40 drops the longer pairs (48 in training) and says so.
  assert m["dropped"] > 0 and m["num_pairs"] == 16 - m["dropped"]


def test_clear_errors(trained, tmp_path, capsys):
  def error(argv) -> str:  # One `error: ...` line, exit status 1, no traceback.
    assert evaluate_lib.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    return err
  path, _, pairs = trained
  bare = tmp_path / "bare"
  bare.mkdir()
  assert "no run_config.json" in error(["--checkpoint", str(bare), "--data", pairs])
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "chosen_response": "b", "rejected_response": 3}\n')
  assert f"{bad}:1: field 'rejected_response'" in error(
      ["--checkpoint", path, "--data", str(bad)])
  assert error(["--checkpoint", path, "--data", pairs, "--batch_size", "0"]) == (
      "error: --batch_size=0 must be >= 1\n")
  with pytest.raises(ValueError, match="--batch_size=0 must be >= 1"):  # --debug: raises.
    evaluate_lib.main(["--checkpoint", path, "--data", pairs, "--batch_size", "0", "--debug"])
