"""init.path (a .nemo, an HF folder, a dpojax workdir) and export.to at the end of a run."""

import os
import re

import jax
import numpy as np
import pytest

from dpojax import convert
from dpojax import pretrained
from dpojax.formats import nemo
from dpojax.train import loop

from conftest import TESTDATA, tiny_config

STORIES = os.path.join(TESTDATA, "stories260k")


def stories_config(init_from):
  config = tiny_config()
  config.init.path = init_from
  config.train.max_steps = 2
  config.eval.interval = 2
  config.checkpoint.interval = 2
  return config


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow
def test_init_from_nemo_trains_and_exports_hf_and_back(tmp_path):
  config = stories_config(os.path.join(STORIES, "nemo", "stories260k-mcore-torch_dist.nemo"))
  config.export.to = str(tmp_path / "aligned_hf")
  out = loop.run(config, str(tmp_path / "run"))
  # The checkpoint's architecture and tokenizer replaced the config's (vocab 512, 5 layers).
  loaded = convert.load(config.export.to)
  assert loaded.config.vocab_size == 512 and loaded.config.num_layers == 5
  assert loaded.tokenizer_path and os.path.isfile(loaded.tokenizer_path)
  assert_trees_equal(loaded.params, jax.device_get(out["state"].params))
  # Training moved the weights away from the initial checkpoint.
  initial = convert.load(os.path.join(STORIES, "hf"))
  assert not np.array_equal(loaded.params["embedding"], initial.params["embedding"])


@pytest.mark.slow
def test_init_from_hf_exports_nemo(tmp_path):
  config = stories_config(os.path.join(STORIES, "hf"))
  config.export.to = str(tmp_path / "aligned.nemo")
  out = loop.run(config, str(tmp_path / "run"))
  loaded = convert.load(config.export.to, extract_dir=str(tmp_path / "x"))
  assert_trees_equal(loaded.params, jax.device_get(out["state"].params))
  # `convert --from WORKDIR` writes the same .nemo as export.to: weights, config, tokenizer.
  again = str(tmp_path / "converted.nemo")
  assert convert.main(["--from", str(tmp_path / "run"), "--to", again]) == 0
  converted = convert.load(again, extract_dir=str(tmp_path / "y"))
  assert converted.config == loaded.config
  assert_trees_equal(converted.params, loaded.params)
  with open(converted.tokenizer_path, "rb") as a, open(loaded.tokenizer_path, "rb") as b:
    assert a.read() == b.read()
  ours, theirs = nemo.read_nemo_config(again), nemo.read_nemo_config(config.export.to)
  for c in (ours, theirs):  # The artifact's name holds a random hex: its bytes are above.
    assert re.fullmatch(r"nemo:[0-9a-f]{32}_tokenizer\.model", c["tokenizer"].pop("model"))
  assert ours == theirs


@pytest.mark.slow
def test_init_from_dpojax_workdir(tmp_path):
  loop.run(tiny_config(), str(tmp_path / "first"))
  config = tiny_config()
  config.init.path = str(tmp_path / "first")
  config.model.hidden_size = 64  # The architecture comes from the first run's run config.
  config.train.max_steps = 1
  config.eval.at_start = True
  second = loop.run(config, str(tmp_path / "second"))
  # At step 0 of the second run, policy = reference = the first run's final params.
  assert second["val"] is not None
  import json
  with open(tmp_path / "second" / "metrics.jsonl") as f:
    val0 = json.loads(f.readline())
  assert val0["step"] == 0 and abs(val0["loss"] - np.log(2)) < 1e-6
  with open(tmp_path / "first" / "metrics.jsonl") as f:
    last_val_first = [json.loads(l) for l in f if '"val"' in l][-1]
  # Same params, so the same policy log-probs on the same validation pairs.
  assert abs(val0["logps_chosen_mean"] - last_val_first["logps_chosen_mean"]) < 1e-4


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_and_exports_them_merged(tmp_path):
  config = stories_config(os.path.join(STORIES, "hf"))
  config.lora.enabled, config.lora.targets, config.lora.rank = True, ("all",), 4
  config.train.learning_rate = 1e-2
  config.export.to = str(tmp_path / "aligned_hf")
  run = str(tmp_path / "run")
  out = loop.run(config, run)
  adapters = jax.device_get(out["state"].params)
  assert set(adapters["layers"]) == {"attention", "mlp"}  # Only adapters were trained.
  initial = convert.load(os.path.join(STORIES, "hf"))
  exported = convert.load(config.export.to)
  # Untargeted weights are the base's, bit for bit; targeted ones moved by B @ A.
  assert_trees_equal(exported.params["embedding"], initial.params["embedding"])
  assert_trees_equal(exported.params["final_norm"], initial.params["final_norm"])
  assert not np.array_equal(exported.params["layers"]["attention"]["query"],
                            initial.params["layers"]["attention"]["query"])
  # The workdir loads as the same merged policy (generate/evaluate use this path).
  policy = pretrained.load_policy(run, extract_dir=str(tmp_path / "x"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               policy.params, exported.params)
  # The checkpoint holds adapters and their Adam moments: a fraction of the full model.
  step_dir = os.path.join(run, "checkpoints", "2")
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
  full = sum(np.asarray(x).nbytes for x in jax.tree.leaves(initial.params))
  assert on_disk < full, (on_disk, full)
  # A LoRA workdir is a valid init.path: training continues from the merged policy.
  second = stories_config(run)
  second.train.max_steps, second.eval.at_start = 1, True
  loop.run(second, str(tmp_path / "second"))
  import json  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "second" / "metrics.jsonl") as f:
    val0 = json.loads(f.readline())
  with open(os.path.join(run, "metrics.jsonl")) as f:
    last_val = [json.loads(l) for l in f if '"val"' in l][-1]
  assert val0["step"] == 0 and abs(val0["loss"] - np.log(2)) < 1e-6
  assert abs(val0["logps_chosen_mean"] - last_val["logps_chosen_mean"]) < 1e-4
