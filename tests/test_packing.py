import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import config as config_lib
from dpojax import model as model_lib
from dpojax.data import batching, packing, pipeline
from dpojax.data.tokenize import Tokenizer
from dpojax.ops import logprob as logprob_lib
from dpojax.train import logps as logps_lib
from dpojax.train import reference as reference_lib
from dpojax.train import step as step_lib

import tolerance
from conftest import ROOT

TOKENIZER = os.path.join(ROOT, "dpojax", "assets", "tokenizer.model")
VAL = os.path.join(ROOT, "dpojax", "assets", "toy_prefs_val.jsonl")


def reference_first_fit(sizes, capacity):
  """Textbook first fit: each item into the first bin with room (lists of item positions)."""
  bins, room = [], []
  for j, s in enumerate(sizes):
    for b in range(len(bins)):
      if room[b] >= s:
        bins[b].append(j)
        room[b] -= s
        break
    else:
      bins.append([j])
      room.append(capacity - s)
  return bins


def rows_of(row_starts, items):
  return [items[row_starts[r]:row_starts[r + 1]].tolist() for r in range(len(row_starts) - 1)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_decreasing_matches_the_textbook_algorithm(seed):
  rng = np.random.default_rng(100 + seed)
  lengths = rng.integers(1, 300, 2000) if seed else rng.integers(40, 60, 500)
  row_starts, items = packing.pack(lengths, 512, "first_fit_decreasing", seed=seed)
  assert sorted(items.tolist()) == list(range(len(lengths)))
  # FFD's bins (their fill, in creation order) do not depend on how equal lengths are ordered.
  want = reference_first_fit(sorted(lengths.tolist(), reverse=True), 512)
  got_fill = [int(lengths[r].sum()) for r in rows_of(row_starts, items)]
  sorted_lengths = sorted(lengths.tolist(), reverse=True)
  assert got_fill == [sum(sorted_lengths[j] for j in b) for b in want]
  assert [sorted(lengths[r].tolist(), reverse=True) for r in rows_of(row_starts, items)] == [
      [sorted_lengths[j] for j in b] for b in want]


@pytest.mark.parametrize("seed", [0, 5])
def test_first_fit_shuffle_matches_the_textbook_algorithm(seed):
  lengths = np.random.default_rng(seed).integers(1, 700, 1500)
  row_starts, items = packing.pack(lengths, 1024, "first_fit_shuffle", seed=seed)
  order = np.random.default_rng(seed).permutation(len(lengths))  # The documented order.
  want = [[int(order[j]) for j in b] for b in reference_first_fit(lengths[order].tolist(), 1024)]
  assert rows_of(row_starts, items) == want
  # Another seed: another packing of the same items.
  other = rows_of(*packing.pack(lengths, 1024, "first_fit_shuffle", seed=seed + 1))
  assert other != want and sorted(sum(other, [])) == list(range(len(lengths)))


def test_pack_rejects_items_longer_than_a_row():
  with pytest.raises(ValueError, match=r"item lengths must be in \[1, 10\], got \[3, 11\]"):
    packing.pack([3, 11], 10, "first_fit_decreasing", seed=0)
  stats = packing.stats(np.array([6, 4, 9]), np.array([0, 2, 3]), 10)
  assert stats["token_efficiency"] == pytest.approx(19 / 20)
  assert (stats["rows"], stats["pairs_per_row_max"], stats["pairs_per_row_mean"]) == (2, 2, 1.5)


def fake_pair(prompt, chosen, rejected, reward=None):
  return {"chosen": np.asarray(prompt + chosen, np.int32),
          "rejected": np.asarray(prompt + rejected, np.int32), "prompt_len": len(prompt),
          "line": 0, "chosen_reward": reward, "rejected_reward": None}


def test_collate_rows_layout():
  pairs = [fake_pair([1, 5], [6, 7], [8]), fake_pair([1], [9, 9, 9], [4, 4], reward=2.0),
           fake_pair([1, 2, 3], [5], [6])]
  batch = packing.collate_rows([[0, 1], [2], None, [1]], lambda i: pairs[i], micro_rows=2,
                               pack_size=16, pairs_per_row=2, default_rewards=(1.0, -1.0))
  assert batch["tokens"].shape == (2, 2, 16) and batch["pair_mask"].shape == (2, 4)
  # Row 0: pair 0 (chosen, rejected), then pair 1 (chosen, rejected), then padding.
  assert batch["tokens"][0, 0].tolist() == [1, 5, 6, 7, 1, 5, 8, 1, 9, 9, 9, 1, 4, 4, 0, 0]
  assert batch["positions"][0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 0]
  assert batch["segment_ids"][0, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 0, 0]
  assert batch["loss_mask"][0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0]
  # Pair slots: row r's j-th pair is p = 2r + j; sequence ids 2p + side.
  assert batch["sequence_ids"][0, 0].tolist() == [0] * 4 + [1] * 3 + [2] * 4 + [3] * 3 + [-1] * 2
  assert batch["tokens"][0, 1].tolist()[:9] == [1, 2, 3, 5, 1, 2, 3, 6, 0]
  assert batch["sequence_ids"][0, 1].tolist() == [4] * 4 + [5] * 4 + [-1] * 8
  assert batch["pair_mask"].tolist() == [[1, 1, 1, 0], [0, 0, 1, 0]]
  assert batch["chosen_reward"].tolist() == [[1.0, 2.0, 1.0, 0.0], [0, 0, 2.0, 0]]
  assert batch["rejected_reward"][0].tolist() == [-1.0, -1.0, -1.0, 0.0]
  assert (batch["segment_ids"][1, 0] == 0).all() and (batch["sequence_ids"][1, 0] == -1).all()
  assert batch["tokens"][1, 1].tolist()[:7] == [1, 9, 9, 9, 1, 4, 4]
  assert batch["sequence_ids"][1, 1].tolist()[:7] == [4, 4, 4, 4, 5, 5, 5]
  # A process's block of a 4-row micro-batch: the same rows with global sequence ids.
  block = packing.collate_rows([[2], [0]], lambda i: pairs[i], micro_rows=2, pack_size=16,
                               pairs_per_row=2, default_rewards=(1.0, -1.0), row_offset=2)
  assert block["sequence_ids"][0, 0].tolist()[:8] == [8] * 4 + [9] * 4
  assert block["sequence_ids"][0, 1].tolist()[:7] == [12] * 4 + [13] * 3
  assert block["pair_mask"].tolist() == [[1, 0, 1, 0]]


def test_collate_rows_shared_prompt_layout():
  """[prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected], branch ids 0 | 1 | 2, positions
  restarting at P - 1 in each branch, one segment per pair."""
  pairs = [fake_pair([1, 5, 2], [6, 7], [8]), fake_pair([1], [9, 9], [4, 4, 4])]
  batch = packing.collate_rows([[0, 1]], lambda i: pairs[i], micro_rows=1, pack_size=16,
                               pairs_per_row=2, default_rewards=(1.0, 0.0), share_prompt=True)
  assert packing.item_lengths([3, 1], [5, 3], [4, 4], True).tolist() == [7, 7]
  row = lambda k: batch[k][0, 0].tolist()
  assert row("tokens") == [1, 5, 2, 6, 7, 2, 8, 1, 9, 9, 1, 4, 4, 4, 0, 0]
  assert row("positions") == [0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 0, 1, 2, 3, 0, 0]
  assert row("branch_ids") == [0, 0, 1, 1, 1, 2, 2, 1, 1, 1, 2, 2, 2, 2, 0, 0]
  assert row("segment_ids") == [1] * 7 + [2] * 7 + [0, 0]
  assert row("loss_mask") == [0, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0]
  assert row("sequence_ids") == [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, -1, -1]
  # An empty prompt: nothing shared, and the rejected branch's first token is no target.
  empty = fake_pair([], [6, 7], [8, 9])
  batch = packing.collate_rows([[0]], lambda i: [empty][i], micro_rows=1, pack_size=6,
                               pairs_per_row=1, default_rewards=(1.0, 0.0), share_prompt=True)
  assert batch["tokens"][0, 0].tolist() == [6, 7, 8, 9, 0, 0]
  assert batch["loss_mask"][0, 0].tolist() == [0, 1, 0, 1, 0, 0]
  odd = dict(fake_pair([1, 5], [6], [7]), rejected=np.asarray([1, 3, 7], np.int32), line=9)
  with pytest.raises(ValueError, match="line 9: chosen and rejected do not start with the "
                     "same 2 prompt tokens"):
    packing.collate_rows([[0]], lambda i: odd, micro_rows=1, pack_size=8, pairs_per_row=1,
                         default_rewards=(1.0, 0.0), share_prompt=True)


def test_collate_rows_refuses_overflow():
  pairs = [fake_pair([1], [2, 3], [4])]
  with pytest.raises(ValueError, match="row 0 overflows pack_size=5"):
    packing.collate_rows([[0, 0]], lambda i: pairs[i], micro_rows=1, pack_size=5,
                         pairs_per_row=2, default_rewards=(1.0, 0.0))
  with pytest.raises(ValueError, match="row 1 holds 2 pairs, more than 1"):
    packing.collate_rows([[0], [0, 0]], lambda i: pairs[i], micro_rows=2, pack_size=8,
                         pairs_per_row=1, default_rewards=(1.0, 0.0))


@pytest.fixture(scope="module")
def toy_pairs():
  tok = Tokenizer(TOKENIZER)
  opts = pipeline.DataOptions(max_seq_length=48, packing="first_fit_decreasing", pack_size=96)
  data = pipeline.PreferenceData(VAL, tok, opts)
  return data, [data[i] for i in range(12)]


def packed_batch(pairs, pack_size, spare_slots, share_prompt=False):
  """All pairs in one packed micro-batch; returns it and, per pair, its slot."""
  lengths = packing.item_lengths([p["prompt_len"] for p in pairs],
                                 [len(p["chosen"]) for p in pairs],
                                 [len(p["rejected"]) for p in pairs], share_prompt)
  row_starts, items = packing.pack(lengths, pack_size, "first_fit_decreasing", seed=0)
  rows = [items[row_starts[r]:row_starts[r + 1]] for r in range(len(row_starts) - 1)]
  per_row = max(len(r) for r in rows) + spare_slots
  batch = packing.collate_rows(rows, lambda i: pairs[i], micro_rows=len(rows),
                               pack_size=pack_size, pairs_per_row=per_row,
                               default_rewards=(1.0, 0.0), share_prompt=share_prompt)
  slots = np.zeros(len(pairs), np.int64)
  for r, row in enumerate(rows):
    slots[row] = r * per_row + np.arange(len(row))
  return batch, slots


@pytest.mark.parametrize("share_prompt", [False, True])
def test_targets_shift_by_one_and_never_cross_a_segment(toy_pairs, share_prompt):
  _, pairs = toy_pairs
  batch, slots = packed_batch(pairs, 96, 1, share_prompt)
  micro = {k: jnp.asarray(v[0]) for k, v in batch.items()}
  targets, mask, target_seq = map(np.asarray, logprob_lib.shift_targets(
      micro["tokens"], micro["segment_ids"], micro["loss_mask"], micro["sequence_ids"]))
  tokens, seg, seq = batch["tokens"][0], batch["segment_ids"][0], batch["sequence_ids"][0]
  rows, cols = np.nonzero(mask)
  assert (cols + 1 < tokens.shape[1]).all()
  np.testing.assert_array_equal(targets[rows, cols], tokens[rows, cols + 1])
  np.testing.assert_array_equal(seg[rows, cols + 1], seg[rows, cols])  # Same segment...
  assert (seg[rows, cols] > 0).all()
  np.testing.assert_array_equal(target_seq[rows, cols], seq[rows, cols])  # ...same sequence.
  # Each sequence's targets are exactly its response tokens, in order.
  for index, pair in enumerate(pairs):
    for side, name in enumerate(("chosen", "rejected")):
      r, c = np.nonzero(mask & (target_seq == 2 * slots[index] + side))
      assert targets[r, c].tolist() == pair[name][pair["prompt_len"]:].tolist()
  # The last token of every segment predicts nothing.
  last = (seg[:, :-1] != seg[:, 1:]) & (seg[:, :-1] > 0)
  assert not mask[:, :-1][last].any()


@pytest.fixture(scope="module")
def tiny_step():
  """One float64 step: packed = padded is an identity of exact arithmetic, so it is checked
  where rounding is 2^-29 times smaller than in float32 (whose worst-case bound for these
  sums, tolerance.logp_tolerance, is about 0.06 for 25 tokens: loose enough to hide a
  mask that lets a branch see a few extra tokens)."""
  cfg = step_lib.StepConfig(model=model_lib.ModelConfig(
      vocab_size=384, hidden_size=32, num_layers=1, num_attention_heads=4, num_query_groups=2,
      ffn_hidden_size=64, dtype="float64", param_dtype="float64"),
      loss=config_lib.LossConfig(beta=1.0, ld_alpha=0.5, use_weighting=True),
      logprob_impl="xla")  # Logits in the hidden states' dtype (the kernels' is fp32).
  # Any parameters will do: random ones from the init's shapes (tracing only, no compile).
  with jax.enable_x64(True):
    shapes = jax.eval_shape(lambda k: model_lib.init_params(cfg.model, k), jax.random.key(0))
  rng = np.random.default_rng(0)
  draw = lambda s: rng.normal(0.0, 0.3, s.shape)  # float64 NumPy: stays float64 under x64.
  params, ref_params = jax.tree.map(draw, shapes), jax.tree.map(draw, shapes)

  @jax.jit
  def step(micro, normalizers):  # One compilation per layout: log-probs, loss and metrics.
    out = logps_lib.sequence_logps(params, micro, cfg)
    ref = logps_lib.sequence_logps(ref_params, micro, cfg, policy=False)
    return out, ref, step_lib.micro_loss(params, ref_params, micro, cfg, normalizers)

  def run(micro, normalizers):  # NumPy out: jax ops outside the context would drop to fp32.
    with jax.enable_x64(True):
      return jax.device_get(step(micro, normalizers))

  run.cfg, run.params, run.ref_params = cfg, params, ref_params
  return run


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_and_padded_give_the_same_logps_loss_and_metrics(toy_pairs, tiny_step,
                                                                share_prompt):
  """Packed rows, with or without a shared prompt, give the padded layout's numbers: so a
  branch sees the prompt and itself only (seeing the sibling response would move them)."""
  _, pairs = toy_pairs
  n = len(pairs)
  padded = batching.collate(pairs, micro_batch_size=n, seq_len=48,
                            opts=pipeline.DataOptions(max_seq_length=48))
  packed, slots = packed_batch(pairs, 96, 1, share_prompt)  # One spare (masked) slot per row.
  assert packed["tokens"].shape[1] < n  # Rows really hold several pairs.
  assert ("branch_ids" in packed) == share_prompt
  first = lambda b: {k: jnp.asarray(v[0]) for k, v in b.items()}
  normalizers = {"pairs": np.float64(n)}
  padded_out, padded_ref, (want_loss, want_m) = tiny_step(first(padded), normalizers)
  packed_out, packed_ref, (got_loss, got_m) = tiny_step(first(packed), normalizers)
  want_ref, got_ref = padded_ref["logps"], packed_ref["logps"]
  want, want_counts = np.asarray(padded_out["logps"]), np.asarray(padded_out["counts"])
  got, got_counts = np.asarray(packed_out["logps"]), np.asarray(packed_out["counts"])
  assert want.dtype == np.float64
  unused = np.setdiff1d(np.arange(len(got)), slots)
  assert len(unused) >= packed["tokens"].shape[1]
  np.testing.assert_array_equal(got_counts[slots], want_counts)
  np.testing.assert_array_equal(got_counts[unused], 0)
  # The rounding of each layout's sums, with the longer (packed) row's attention.
  cfg = tiny_step.cfg
  tol = {name: tolerance.logp_tolerance(want_counts, cfg.model, p, model_lib.output_weight(
      p, cfg.model), row_len=96, dtype=np.float64)
         for name, p in (("policy", tiny_step.params), ("ref", tiny_step.ref_params))}
  assert tol["policy"].max() < 1e-8  # Far below any layout effect (tokens' log-probs ~ -6).
  assert (np.abs(got[slots] - want) <= tol["policy"]).all(), np.abs(got[slots] - want).max()
  assert (np.abs(np.asarray(got_ref)[slots] - want_ref) <= tol["ref"]).all()
  np.testing.assert_allclose(np.asarray(packed_ref["ld_logps"])[slots], padded_ref["ld_logps"],
                             rtol=0, atol=tol["ref"].max())
  assert np.abs(want).min() > 1.0  # Real sums, not zeros.
  for key in ("ld_logps", "wpo_logps"):  # LD-DPO weights (<= 1) and WPO's per-token means.
    np.testing.assert_allclose(np.asarray(packed_out[key])[slots], padded_out[key], rtol=0,
                               atol=tol["policy"].max(), err_msg=key)
  np.testing.assert_array_equal(got[unused], 0)
  assert abs(float(want_loss) - np.log(2)) > 1e-3  # Policy != reference: a real loss.
  # Loss and metrics are sums over pairs of smooth functions of the four log-probs of a pair,
  # with slopes at most beta (1 + 2 max|reward|) (the squared rewards have the steepest) or 1
  # (the log-prob sums); add the rounding of a sum of n pairs. The rewards compare the
  # statistic the loss uses (LD-DPO's weighted sums here, each within tol of its layout twin).
  key = reference_lib.reference_key(cfg)
  assert key == "ld_logps"
  pi, rho = np.asarray(padded_out[key]), np.asarray(padded_ref[key])
  margins = cfg.loss.beta * ((pi[:, 0] - rho[:, 0]) - (pi[:, 1] - rho[:, 1]))
  rewards = cfg.loss.beta * (pi - rho)
  slope = max(1.0, cfg.loss.beta * (1 + 2 * np.abs(rewards).max()))
  total = slope * (tol["policy"].sum() + tol["ref"].sum())
  bound = lambda value: total + tolerance.sum_tolerance(n, abs(value), np.float64)
  assert abs(float(got_loss) - float(want_loss)) <= bound(want_loss)
  assert got_m.keys() == want_m.keys()
  # Accuracy counts margins > 0: a step function, equal when no margin is within the bound.
  assert np.abs(margins).min() > total
  for k in want_m:
    assert abs(float(got_m[k]) - float(want_m[k])) <= bound(want_m[k]), k
  assert float(got_m["num_pairs"]) == n
  assert float(got_m["accuracy"]) == float(want_m["accuracy"]) == np.sum(margins > 0)
