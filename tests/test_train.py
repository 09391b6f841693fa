import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import model as model_lib
from dpojax import pretrained
from dpojax.data import batching, pipeline
from dpojax.train import build as build_lib
from dpojax.train import compiled as compiled_lib
from dpojax.train import loop
from dpojax.train import step as step_lib

from dpojax.train.metrics import TIMING_METRICS
import tolerance
from conftest import ROOT, tiny_config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Six steps straight, shared by several tests (one compilation)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  out = loop.run(tiny_config(), workdir)
  return workdir, out


def test_first_step_is_ln2_with_zero_accuracy(uninterrupted):
  records = read_metrics(uninterrupted[0])
  first_train = next(r for r in records if r["split"] == "train")
  first_val = next(r for r in records if r["split"] == "val")
  assert first_train["step"] == 1 and first_val["step"] == 0
  for r in (first_train, first_val):
    assert abs(r["loss"] - math.log(2)) < 1e-6
    assert r["accuracy"] == 0.0
    assert r["rewards_margin_mean"] == 0.0


def test_run_leaves_metrics_events_and_checkpoints(uninterrupted):
  workdir, _ = uninterrupted
  records = read_metrics(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in records if r["split"] == "val"] == [0, 3, 6]
  for key in ("loss", "accuracy", "rewards_chosen_mean", "rewards_rejected_mean",
              "rewards_margin_mean", "logps_chosen_mean", "logps_rejected_mean"):
    assert all(key in r for r in records)
  assert all(r["num_pairs"] == 8 for r in records if r["split"] == "train")
  assert os.listdir(os.path.join(workdir, "tensorboard"))[0].startswith("events.out.tfevents")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


@pytest.mark.slow
def test_resume_continues_exactly(uninterrupted, tmp_path):
  straight_dir, straight = uninterrupted
  config = tiny_config()
  config.train.max_steps = 3
  loop.run(config, str(tmp_path))
  config.train.max_steps = 6
  resumed = loop.run(config, str(tmp_path))
  a = [r for r in read_metrics(straight_dir)]
  b = [r for r in read_metrics(str(tmp_path))]
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for ra, rb in zip(a, b):
    for key in ra:
      if key not in TIMING_METRICS and key != "split":
        assert ra[key] == pytest.approx(rb[key], abs=1e-6, rel=1e-6), (ra["step"], key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               straight["state"].params, resumed["state"].params)



def assert_same_records(a, b, tol):
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for ra, rb in zip(a, b):
    for key in ra:
      if key not in TIMING_METRICS and key != "split":
        assert rb[key] == pytest.approx(ra[key], abs=tol, rel=tol), (ra["step"], key)


class _SpyDataset:
  """Wraps train_dataset's result: records the pair indices of every batch the loop draws."""

  def __init__(self, ds, seen):
    self.ds, self.seen = ds, seen

  def __iter__(self):
    return _SpyIterator(iter(self.ds), self.seen)


class _SpyIterator:

  def __init__(self, it, seen):
    self.it, self.seen = it, seen

  def __next__(self):
    batch = next(self.it)
    self.seen.append(batch["pair_index"][batch["pair_mask"] > 0].tolist())
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


@pytest.mark.slow
def test_no_shuffle_trains_on_the_file_in_order_and_resumes_exactly(tmp_path, monkeypatch,
                                                                   capsys):
  """data.shuffle=False with TRL's schedule (linear decay, no warmup): step k trains on pairs
  8(k-1) .. 8k-1 of the file, as TRL's sequential sampler, and a run resumed from its step-3
  checkpoint gives the uninterrupted run's batches and metrics."""
  seen = []
  real = batching.train_dataset
  monkeypatch.setattr(loop.batching, "train_dataset",
                      lambda *a, **k: _SpyDataset(real(*a, **k), seen))
  train_copy = tmp_path / "my_pairs.jsonl"  # The toy pairs under a user's name.
  train_copy.write_text(open(pipeline.TOY_TRAIN).read())

  def config(steps):
    c = tiny_config()
    c.data.shuffle, c.data.train_path = False, str(train_copy)
    c.train.lr_schedule, c.train.warmup_steps, c.train.max_steps = "linear", 0, steps
    return c

  loop.run(config(6), str(tmp_path / "straight"))
  straight_seen, seen[:] = list(seen), []  # (Eval batches come from eval_batches.)
  assert straight_seen == [list(range(8 * k, 8 * k + 8)) for k in range(6)]
  printed = capsys.readouterr().out
  assert (f"WARNING: data.train_path={train_copy} but data.val_path is still the shipped toy "
          "set") in printed
  # Interrupted after step 3: the workdir as the checkpoint of step 3 left it.
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  shutil.rmtree(tmp_path / "resumed" / "best", ignore_errors=True)
  loop.run(config(6), str(tmp_path / "resumed"))
  assert seen == straight_seen[3:]
  assert_same_records(read_metrics(str(tmp_path / "straight")),
                      read_metrics(str(tmp_path / "resumed")), 1e-6)
  lrs = [r["learning_rate"] for r in read_metrics(str(tmp_path / "straight"))
         if r["split"] == "train"]  # Step k's update used lr * (6 - (k - 1)) / 6.
  assert lrs == pytest.approx([1e-3 * (6 - k) / 6 for k in range(6)], rel=1e-5)


@pytest.mark.slow
def test_precomputed_reference_run_matches_copy(uninterrupted, tmp_path):
  """reference.mode=precomputed: the same losses and metrics as the live copy, from a table
  computed once and cached on disk."""
  straight_dir, straight = uninterrupted
  config = tiny_config()
  config.reference.mode = "precomputed"
  config.reference.cache_dir = str(tmp_path / "cache")
  out = loop.run(config, str(tmp_path / "run"))
  assert_same_records(read_metrics(straight_dir), read_metrics(str(tmp_path / "run")), 1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
               straight["state"].params, out["state"].params)
  assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")]) == 2


@pytest.mark.slow
def test_tr_dpo_reference_sync_resumes_exactly(tmp_path):
  """The synced reference lives in the train state: it is checkpointed, and a resumed run
  continues exactly; the sync moved it away from the initial policy."""
  config = tiny_config()
  config.reference.sync_steps, config.reference.sync_alpha = 2, 0.5
  config.train.max_steps, config.eval.interval, config.checkpoint.interval = 4, 2, 2
  straight = loop.run(config, str(tmp_path / "straight"))
  config.train.max_steps = 2
  loop.run(config, str(tmp_path / "resumed"))
  config.train.max_steps = 4
  resumed = loop.run(config, str(tmp_path / "resumed"))
  assert_same_records(read_metrics(str(tmp_path / "straight")),
                      read_metrics(str(tmp_path / "resumed")), 1e-6)
  for part in ("params", "ref"):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                 getattr(straight["state"], part), getattr(resumed["state"], part))
  init = model_lib.init_params(model_lib.ModelConfig.from_dict(config.model),
                               jax.random.key(config.train.seed))
  moved = jax.tree.map(lambda r, p: float(np.max(np.abs(np.asarray(r) - np.asarray(p)))),
                       straight["state"].ref, init)
  assert max(jax.tree.leaves(moved)) > 1e-4


@pytest.mark.slow
def test_eval_interval_as_a_fraction_of_an_epoch(tmp_path):
  config = tiny_config()
  config.train.max_steps = 5
  config.eval.interval_epochs = 0.01
  workdir = str(tmp_path / "run")
  loop.run(config, workdir)
  train_data = build_lib.build(config)[1]
  epoch_steps = len(train_data) / config.train.global_batch_size  # Padded: pairs / batch.
  every = round(0.01 * epoch_steps)
  assert every == 2, (len(train_data), epoch_steps)
  assert [r["step"] for r in read_metrics(workdir) if r["split"] == "val"] == [0, 2, 4, 5]

@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
  config = tiny_config()
  _, train_data, _, step_cfg = build_lib.build(config)
  pairs = [train_data[i] for i in range(8)]
  params = model_lib.init_params(step_cfg.model, jax.random.key(0))
  ref = jax.tree.map(jnp.copy, params)
  tx, schedule = step_lib.make_optimizer(config.train)
  results = []
  for micro in (8, 2):
    batch = batching.collate(pairs, micro_batch_size=micro, seq_len=48, opts=train_data.opts)
    step = jax.jit(lambda s, r, b: step_lib.train_step(s, r, b, cfg=step_cfg, tx=tx,
                                                       schedule=schedule))
    state = step_lib.init_state(params, tx)
    for _ in range(2):
      state, metrics = step(state, ref, batch)
    results.append((state, metrics))
  (s1, m1), (s4, m4) = results
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), s1.params, s4.params)
  for key in m1:
    np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert float(m1["num_pairs"]) == 8


@pytest.mark.slow
def test_shared_prompt_run_validates_like_separate_sequences(tmp_path):
  """data.share_prompt end to end (pipeline, sharding, train and eval steps): the step-0
  validation over the whole split gives the same mean log-probs as packing without it."""
  vals = []
  for share in (False, True):
    config = tiny_config()
    config.data.packing, config.data.share_prompt = "first_fit_decreasing", share
    config.train.max_steps, config.eval.max_batches = 1, -1
    workdir = str(tmp_path / f"share{share}")
    loop.run(config, workdir)
    records = read_metrics(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1]
    assert all(np.isfinite(r["loss"]) for r in records)
    vals.append(next(r for r in records if r["split"] == "val"))
  plain, shared = vals
  assert shared["num_pairs"] == plain["num_pairs"] == 192  # 8 of 200 dropped as too long.
  # Means over the split of per-sequence sums (at most max_seq_length tokens each) that the
  # two layouts round differently, summed over the pairs in different orders (float64
  # equality of the layouts: tests/test_packing.py).
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  params = model_lib.init_params(model_cfg, jax.random.key(config.train.seed))
  per_seq = tolerance.logp_tolerance(config.data.max_seq_length, model_cfg, params,
                                     model_lib.output_weight(params, model_cfg),
                                     row_len=2 * config.data.max_seq_length)
  for key in ("logps_chosen_mean", "logps_rejected_mean"):
    assert abs(plain[key]) > 1.0
    bound = per_seq + tolerance.sum_tolerance(192, abs(plain[key]))
    assert abs(shared[key] - plain[key]) <= bound, (key, shared[key], plain[key], bound)


@pytest.mark.parametrize("key,value,message", [
    ("train.micro_batch_size", 3, "train.global_batch_size=8 is not a multiple"),
    ("dpo.beta", 0.0, "dpo.beta=0.0 must be positive"),
])
def test_config_errors_name_the_key(key, value, message):
  config = tiny_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    build_lib.build(config)


@pytest.mark.parametrize("key,value,message", [
    ("train.learning_rate", -1.0, r"^train.learning_rate=-1.0 must be positive$"),
    ("train.adam_b2", 1.0, r"^train.adam_b2=1.0 must be in \[0, 1\)$"),
    ("checkpoint.on_error", "foo",
     r"^checkpoint.on_error='foo' is not one of \('stop', 'continue'\)$"),
    ("model.dtype", "float8", r"^model.dtype='float8' is not one of \('float32', "),
    ("model.param_dtype", "int8", r"^model.param_dtype='int8' is not one of "),
    ("model.hidden_size", 63,
     r"^model.hidden_size=63 is not a multiple of model.num_attention_heads=2 \(or set "),
    ("model.rotary_percentage", 0.1,
     r"^model.rotary_percentage=0.1 of the head dim 16 gives an odd rotary dim 1$"),
])
def test_bad_values_stop_before_anything_compiles(key, value, message, tmp_path, monkeypatch):
  def compiled(*args, **kwargs):
    raise AssertionError("compiled before the config was checked")
  monkeypatch.setattr(compiled_lib, "compile_steps", compiled)
  monkeypatch.setattr(pretrained, "load_pretrained", compiled)  # Before init.from is even read.
  config = tiny_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    loop.run(config, str(tmp_path))


@pytest.mark.slow
def test_default_cli_run_learns(tmp_path):
  """Quickstart (a): the default config from the command line, as a user runs it."""
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
      [sys.executable, "-m", "dpojax.main", "--config=configs/dpo_gpt.py",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  val = [r for r in read_metrics(workdir) if r["split"] == "val"]
  assert val[0]["accuracy"] == 0.0 and val[-1]["accuracy"] >= 0.8
  assert val[-1]["rewards_chosen_mean"] > val[-1]["rewards_rejected_mean"]
  assert val[-1]["rewards_margin_mean"] > val[1]["rewards_margin_mean"] > 0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "200"))
  from PIL import Image
  curves = Image.open(os.path.join(workdir, "curves.png"))
  assert curves.size == (1500, 800)
  assert len(curves.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # Not blank.


@pytest.mark.slow
def test_rpo_reads_rewards_from_jsonl(tmp_path):
  """rpo_sq at policy = reference is g^2 = (gt_reward_scale * (R_c - R_r))^2 = 9."""
  rows = [{"prompt": f"Count from {i} to {i + 3}.", "chosen_response": " ".join(
      str(i + k) for k in range(4)), "rejected_response": "No.", "chosen_reward": 3.0,
           "rejected_reward": 0.0} for i in range(16)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = tiny_config()
  config.data.train_path = config.data.val_path = str(path)
  config.dpo.preference_loss = "rpo_sq"
  config.train.max_steps = 1
  loop.run(config, str(tmp_path / "run"))
  val0 = read_metrics(str(tmp_path / "run"))[0]
  assert val0["step"] == 0 and val0["loss"] == pytest.approx(9.0, abs=1e-5)


def test_a_from_scratch_model_is_sized_by_its_tokenizer():
  """model.vocab_size under the tokenizer's: the model takes the tokenizer's size (a
  pretrained model's own vocab is never changed: that stays an error)."""
  config = tiny_config()
  config.model.vocab_size = 100
  tok, _, _, step_cfg = build_lib.build(config)
  assert tok.vocab_size == 384 and step_cfg.model.vocab_size == 384
