"""data/buckets.py: length buckets, response positions and per-step (pair-counted) packing
change what a step computes, never a per-pair log-prob or a gradient (beyond rounding)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import model as model_lib
from dpojax.data import batching, buckets, packing, pipeline
from dpojax.data.tokenize import Tokenizer
from dpojax.ops import logprob as logprob_lib
from dpojax.train import logps as logps_lib
from dpojax.train import loop
from dpojax.train import step as step_lib
from dpojax.train.metrics import TIMING_METRICS

from conftest import ROOT, tiny_config

TOKENIZER = os.path.join(ROOT, "dpojax", "assets", "tokenizer.model")
VAL = os.path.join(ROOT, "dpojax", "assets", "toy_prefs_val.jsonl")
SEQ = 48


def test_ladder_and_fit():
  assert buckets.ladder(64, 4) == (32, 64)  # 16 and 48 round up to the tile multiple.
  assert buckets.ladder(192, 4) == (64, 96, 160, 192)
  assert buckets.ladder(192, 1) == (192,)
  assert buckets.ladder(50, 8) == (32, 50)  # Capped at the largest.
  assert buckets.ladder(4, 4, round_to=1) == (1, 2, 3, 4)
  assert [buckets.fit(v, (32, 64)) for v in (1, 32, 33, 64)] == [32, 32, 64, 64]


def _data(**kw):
  opts = pipeline.DataOptions(max_seq_length=SEQ, **kw)
  return pipeline.PreferenceData(VAL, Tokenizer(TOKENIZER), opts)


@pytest.fixture(scope="module")
def layouts():
  """The first global batch (8 pairs, 2 micro-batches) of the val file in each layout."""
  def first(**kw):
    data = _data(**kw)
    it = iter(batching.train_dataset(data, global_batch_size=8, micro_batch_size=4, seed=3))
    return data, next(it)

  return {
      "max": first(length_buckets=1, response_only=False),  # Yesterday's padding.
      "padded": first(),
      "batch": first(packing="batch"),
      "batch_shared": first(packing="batch", share_prompt=True),
      "rows": first(packing="first_fit_decreasing", pack_size=2 * SEQ),
      "rows_shared": first(packing="first_fit_decreasing", pack_size=2 * SEQ,
                           share_prompt=True),
  }


def test_shapes_follow_the_data(layouts):
  data, full = layouts["max"]
  assert full["tokens"].shape == (2, 8, SEQ) and "loss_positions" not in full
  _, padded = layouts["padded"]
  longest = int(max(data.chosen_len[full["pair_index"].ravel()].max(),
                    data.rejected_len[full["pair_index"].ravel()].max()))
  assert padded["tokens"].shape[-1] == buckets.fit(longest, buckets.ladder(SEQ, 4))
  np.testing.assert_array_equal(padded["tokens"], full["tokens"][..., :padded["tokens"].shape[-1]])
  for k in ("pair_index", "pair_mask", "chosen_reward", "rejected_reward"):
    for name in ("batch", "batch_shared"):  # Same pairs, same slots as padded.
      np.testing.assert_array_equal(layouts[name][1][k], full[k], err_msg=(name, k))
  batch = layouts["batch"][1]
  assert batch["tokens"].shape[1] < 8  # 4 pairs of a micro-batch take fewer than 8 rows.
  real = lambda b: int((b["segment_ids"] > 0).sum())
  assert real(batch) == real(full)
  assert real(layouts["batch_shared"][1]) < real(full)  # The prompts once.


@pytest.mark.parametrize("name", ["padded", "batch", "batch_shared", "rows", "rows_shared"])
def test_loss_positions_are_exactly_the_shifted_targets(layouts, name):
  batch = layouts[name][1]
  mask = np.stack([np.asarray(logprob_lib.shift_targets(*(jnp.asarray(batch[k][a]) for k in (
      "tokens", "segment_ids", "loss_mask", "sequence_ids")))[1])
      for a in range(batch["tokens"].shape[0])])
  np.testing.assert_array_equal(buckets.target_mask(batch["segment_ids"], batch["loss_mask"]),
                                mask)
  pos = batch["loss_positions"]
  assert pos.shape[:2] == mask.shape[:2] and pos.shape[2] < mask.shape[2]
  picked = np.take_along_axis(mask, pos, axis=-1)
  np.testing.assert_array_equal(picked.sum(-1), mask.sum(-1))  # Every target, once.
  for a, r in np.ndindex(*pos.shape[:2]):
    want = np.flatnonzero(mask[a, r])
    np.testing.assert_array_equal(pos[a, r, :len(want)], want)  # In order.
    assert (pos[a, r, len(want):] == mask.shape[2] - 1).all()


def test_add_loss_positions_refuses_a_short_budget(layouts):
  batch = dict(layouts["padded"][1])
  most = int(buckets.target_mask(batch["segment_ids"], batch["loss_mask"]).sum(-1).max())
  with pytest.raises(ValueError, match="more than the budget"):
    buckets.add_loss_positions(batch, most - 1)


def _model(dtype):
  return model_lib.ModelConfig(vocab_size=384, hidden_size=32, num_layers=1,
                               num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                               dtype=dtype, param_dtype=dtype)


def _micro(batch):
  return {k: jnp.asarray(v[0]) for k, v in batch.items()}


@pytest.mark.parametrize("impl,name", [
    (impl, name) if (impl, name) in (("chunked", "rows_shared"), ("triton", "padded"),
                                     ("triton", "rows_shared"))
    else pytest.param(impl, name, marks=pytest.mark.slow)  # The quick loop: the default impl.
    for impl in ("xla", "chunked", "pallas", "triton") for name in ("padded", "rows_shared")])
def test_response_only_equals_the_full_path(layouts, impl, name):
  """Values and gradients (fp32, 1e-5) of every statistic the losses read, on padded, packed
  and shared-prompt rows: with and without `loss_positions`."""
  if impl == "triton" and jax.default_backend() != "gpu":
    pytest.skip("triton runs on a GPU only (the CPU suite covers xla, chunked, pallas)")
  cfg = step_lib.StepConfig(model=_model("float32"),
                            loss=config_lib.LossConfig(beta=1.0, ld_alpha=0.5,
                                                       use_weighting=True),
                            logprob_impl=impl, logprob_token_block=64 if impl == "chunked" else 0)
  params = model_lib.init_params(cfg.model, jax.random.key(1))
  params = jax.tree.map(lambda x: x * 8.0, params)  # Sharper logits than a fresh init.

  @jax.jit
  def stats(params, micro):
    def f(params):
      out = logps_lib.sequence_logps(params, micro, cfg)
      w = jnp.arange(1.0, 1.0 + out["logps"].size).reshape(out["logps"].shape)
      return jnp.sum(w * out["logps"]) + jnp.sum(w[::-1] * out["ld_logps"]), out
    return jax.value_and_grad(f, has_aux=True)(params)

  micro = _micro(layouts[name][1])
  full = {k: v for k, v in micro.items() if k != "loss_positions"}
  (got_v, got), got_g = stats(params, micro)
  (want_v, want), want_g = stats(params, full)
  assert abs(float(want_v)) > 100.0  # Real sums.
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
    scale = float(np.abs(w).max())
    assert scale > 0
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale, err_msg=str(path))


def test_missing_positions_poison_the_sums(layouts):
  cfg = step_lib.StepConfig(model=_model("float32"), loss=config_lib.LossConfig(beta=1.0),
                            logprob_impl="xla")
  params = model_lib.init_params(cfg.model, jax.random.key(1))
  micro = _micro(layouts["padded"][1])
  micro["loss_positions"] = micro["loss_positions"][:, 1:]  # Drops each row's first target.
  out = jax.jit(lambda p, m: logps_lib.sequence_logps(p, m, cfg))(params, micro)
  assert np.isnan(np.asarray(out["logps"])[np.asarray(micro["pair_mask"]) > 0]).all()


def test_every_layout_gives_the_same_per_pair_logps(layouts):
  """float64, so that layout effects would stand far above rounding: padding to the maximum
  (yesterday's), buckets with positions, pair-counted packing with and without a shared
  prompt give each pair the same log-prob sums and counts."""
  cfg = step_lib.StepConfig(model=_model("float64"),
                            loss=config_lib.LossConfig(beta=1.0, ld_alpha=0.5),
                            logprob_impl="xla")
  with jax.enable_x64(True):
    shapes = jax.eval_shape(lambda k: model_lib.init_params(cfg.model, k), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape), shapes)
    fn = jax.jit(lambda p, m: logps_lib.sequence_logps(p, m, cfg))
    results = {}
    for name in ("max", "padded", "batch", "batch_shared"):
      batch = layouts[name][1]
      outs = [jax.device_get(fn(params, {k: jnp.asarray(v[a]) for k, v in batch.items()}))
              for a in range(batch["tokens"].shape[0])]
      results[name] = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  want = results["max"]
  assert np.abs(want["logps"]).min() > 1.0
  for name in ("padded", "batch", "batch_shared"):
    for k in ("logps", "ld_logps"):
      np.testing.assert_allclose(results[name][k], want[k], rtol=1e-10, err_msg=(name, k))
    np.testing.assert_array_equal(results[name]["counts"], want["counts"])


def test_batch_packing_resumes_exactly():
  data = _data(packing="batch")
  ds = batching.train_dataset(data, global_batch_size=4, micro_batch_size=2, seed=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = iter(batching.train_dataset(data, global_batch_size=4, micro_batch_size=2, seed=0))
  again.set_state(state)
  for w in want:
    g = next(again)
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_batch_packing_blocks_agree_across_processes():
  """Two processes get same-shaped blocks whose pairs, concatenated, are the one-process
  batch's (sequence ids global within the micro-batch)."""
  data = _data(packing="batch", share_prompt=True)
  one = next(iter(batching.train_dataset(data, global_batch_size=8, micro_batch_size=4,
                                         seed=5)))
  parts = [next(iter(batching.train_dataset(data, global_batch_size=8, micro_batch_size=4,
                                            seed=5, process_index=i, process_count=2)))
           for i in range(2)]
  assert parts[0].keys() == parts[1].keys() == one.keys()
  for k in parts[0]:
    assert parts[0][k].shape == parts[1][k].shape, k
  for k in ("pair_index", "pair_mask", "chosen_reward", "rejected_reward"):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts], axis=1), one[k])
  for i, p in enumerate(parts):  # Process i holds sequences of pairs 2i, 2i + 1.
    seqs = np.unique(p["sequence_ids"])
    assert set(seqs[seqs >= 0].tolist()) == set(range(4 * i, 4 * i + 4))


@pytest.mark.slow
def test_batch_packed_run_resumes_exactly_and_says_its_layout(tmp_path, capsys):
  """data.packing=batch with a shared prompt: 6 steps straight = 3, then 3 more resumed
  (bucketed shapes change from step to step); the start-up line names the layout."""
  def config(steps):
    c = tiny_config()
    c.data.packing, c.data.share_prompt, c.train.max_steps = "batch", True, steps
    return c

  straight = loop.run(config(6), str(tmp_path / "straight"))
  assert "batches 4 pairs per micro-batch packed into rows of (32, 64, 96) tokens" in \
      capsys.readouterr().out
  loop.run(config(3), str(tmp_path / "resumed"))
  resumed = loop.run(config(6), str(tmp_path / "resumed"))
  read = lambda d: [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")]
  a, b = read("straight"), read("resumed")
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  assert all(r["num_pairs"] == 8 for r in a if r["split"] == "train")  # Pairs, not rows.
  for ra, rb in zip(a, b):
    for key in ra:
      if key not in TIMING_METRICS and key != "split":
        assert ra[key] == rb[key], (ra["step"], key)
  jax.tree.map(np.testing.assert_array_equal, straight["state"].params,
               resumed["state"].params)


def test_batch_packed_rows_come_in_multiples_of_the_devices():
  data = _data(packing="batch")
  packer = buckets.BatchPacker(data, micro_pairs=8, processes=1, count=4, row_multiple=4)
  assert packer.row_sizes == (4, 8)
  batch = packer(list(range(8)), 0)
  assert batch["tokens"].shape[1] in (4, 8) and batch["pair_mask"].shape == (1, 8)
