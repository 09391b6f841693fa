import jax
import jax.numpy as jnp
import numpy as np

from dpojax.ops import logprob as lp


def naive_sequence_logps(logits_BxTxV, tokens, segment_ids, loss_mask, sequence_ids, n):
  """A loop over tokens: token t (t >= 1) is predicted by position t-1 of its segment."""
  sums, counts = np.zeros(n), np.zeros(n)
  b, t, _ = logits_BxTxV.shape
  for i in range(b):
    for j in range(1, t):
      if not loss_mask[i, j] or segment_ids[i, j] == 0 or segment_ids[i, j] != segment_ids[i, j - 1]:
        continue
      row = logits_BxTxV[i, j - 1].astype(np.float64)
      logz = np.log(np.sum(np.exp(row - row.max()))) + row.max()
      sums[sequence_ids[i, j]] += row[tokens[i, j]] - logz
      counts[sequence_ids[i, j]] += 1
  return sums, counts


def make_packed_batch(rng, b=3, t=12, v=11):
  tokens = rng.integers(0, v, size=(b, t))
  segment_ids = np.zeros((b, t), np.int32)
  sequence_ids = -np.ones((b, t), np.int32)
  loss_mask = np.zeros((b, t), np.int32)
  seq = 0
  for i in range(b):
    pos = 0
    for length in (5, 4):  # Two sequences per row, then padding.
      segment_ids[i, pos:pos + length] = length
      sequence_ids[i, pos:pos + length] = seq
      loss_mask[i, pos + 2:pos + length] = 1  # Two prompt tokens.
      seq += 1
      pos += length
  return tokens, segment_ids, loss_mask, sequence_ids, seq


def test_matches_naive_loop_on_packed_rows():
  rng = np.random.default_rng(0)
  tokens, seg, mask, seq_ids, n = make_packed_batch(rng)
  b, t, d, v = tokens.shape[0], tokens.shape[1], 6, 11
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(v, d)).astype(np.float32)
  targets, tmask, tseq = lp.shift_targets(jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(mask),
                                          jnp.asarray(seq_ids))
  logp = lp.logprob(jnp.asarray(hidden), jnp.asarray(w), targets, tmask)
  sums, counts = lp.sequence_sums(logp, tmask, tseq, n)
  expected_sums, expected_counts = naive_sequence_logps(hidden @ w.T, tokens, seg, mask, seq_ids, n)
  np.testing.assert_allclose(np.asarray(sums), expected_sums, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), expected_counts)
  assert list(expected_counts) == [3, 2] * 3  # 5-2 and 4-2 response tokens per sequence.


def test_shift_by_one_and_boundaries():
  tokens = jnp.array([[10, 11, 12, 13, 20, 21, 22, 0]])
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  mask = jnp.array([[0, 1, 1, 1, 0, 1, 1, 0]])
  seq = jnp.array([[0, 0, 0, 0, 1, 1, 1, -1]])
  targets, tmask, tseq = lp.shift_targets(tokens, seg, mask, seq)
  np.testing.assert_array_equal(targets[0, :7], [11, 12, 13, 20, 21, 22, 0])
  # Position 3 would predict token 20 of the next segment: masked. So are the last
  # position, padding, and the prompt token 20 (its loss mask is 0).
  np.testing.assert_array_equal(tmask[0], [1, 1, 1, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(tseq[0, :7], [0, 0, 0, 1, 1, 1, -1])


def test_prompt_and_padding_never_contribute():
  rng = np.random.default_rng(1)
  tokens, seg, mask, seq_ids, n = make_packed_batch(rng)
  b, t, d, v = tokens.shape[0], tokens.shape[1], 4, 11
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(v, d)).astype(np.float32)
  args = [jnp.asarray(x) for x in (tokens, seg, mask, seq_ids)]
  targets, tmask, tseq = lp.shift_targets(*args)

  def sums_of(h):
    return lp.sequence_sums(lp.logprob(h, jnp.asarray(w), targets, tmask), tmask, tseq, n)[0]

  base = sums_of(jnp.asarray(hidden))
  # Hidden states at positions whose target is masked (prompt, boundary, padding) may be
  # anything: the gradient there is exactly zero and the sums do not move.
  grad = jax.grad(lambda h: jnp.sum(sums_of(h)))(jnp.asarray(hidden))
  masked = ~np.asarray(tmask)
  assert masked.sum() > 0
  assert np.all(np.asarray(grad)[masked] == 0)
  noisy = np.where(masked[..., None], rng.normal(size=hidden.shape) * 100, hidden)
  np.testing.assert_array_equal(np.asarray(sums_of(jnp.asarray(noisy, jnp.float32))),
                                np.asarray(base))
