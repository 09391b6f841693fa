"""The block-sparse attention path (ops/sparse_attention.py) against the dense path."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax import model as model_lib
from dpojax.model import lora
from dpojax.ops import sparse_attention as sa

# B, T, N, G, K, block, segment ids per row, branch ids per row (None: no branches).
CASES = {
    "packed_padded_gqa": (2, 64, 4, 2, 8, 8,
                          [[1] * 10 + [2] * 20 + [3] * 25 + [0] * 9, [5] * 30 + [6] * 34], None),
    # Shared-prompt rows: each branch sees the prefix and itself; an id that comes back (7 8 7).
    "branches_noncontiguous": (2, 48, 2, 1, 4, 16,
                               [[1] * 20 + [2] * 28, [7] * 16 + [8] * 16 + [7] * 16],
                               [[0] * 6 + [1] * 7 + [2] * 7 + [0] * 10 + [1] * 9 + [2] * 9,
                                [0] * 48]),
    "left_padding_mha": (1, 32, 2, 2, 8, 8, [[0] * 5 + [3] * 27], None),
}


def run(case, chunk):
  b, t, n, g, kd, block, seg, branch = case
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, t, n, kd)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, t, g, kd)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(seg)
  real = (seg > 0)[:, :, None, None]
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real  # Padding: never a loss.
  mask = model_lib.attention_mask(seg, None if branch is None else jnp.asarray(branch))
  sparse_mask = mask[:, 0] & (seg > 0)[:, :, None]
  pairs = sa.tile_pairs(sparse_mask, block, chunk)
  ours = lambda q, k, v: sa.attention(q, k, v, sparse_mask, pairs, block, chunk)
  dense = lambda q, k, v: model_lib.attend(q, k, v, mask)
  return q, k, v, cot, real, ours, dense, sparse_mask, pairs, block


@pytest.mark.parametrize("chunk", [3, 32])
@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_match_dense_attention(name, chunk):
  q, k, v, cot, real, ours, dense, *_ = run(CASES[name], chunk)
  np.testing.assert_allclose(ours(q, k, v) * real, dense(q, k, v) * real, atol=2e-6)
  np.testing.assert_array_equal(ours(q, k, v) * ~real, 0.0)  # Padding attends to nothing.
  loss = lambda f: jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * cot), argnums=(0, 1, 2)))
  for got, want in zip(loss(ours)(q, k, v), loss(dense)(q, k, v)):
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("name", list(CASES))
def test_tile_pairs_are_exactly_the_tiles_with_a_true_entry(name):
  *_, sparse_mask, (q_tile, k_tile, count), block = run(CASES[name], 32)
  m = np.asarray(sparse_mask)
  b, t, _ = m.shape
  nt = t // block
  want = [(r * nt + i, r * nt + j) for r in range(b) for i in range(nt) for j in range(nt)
          if m[r, i * block:(i + 1) * block, j * block:(j + 1) * block].any()]
  got = list(zip(np.asarray(q_tile)[:int(count)].tolist(), np.asarray(k_tile)[:int(count)].tolist()))
  assert got == want and 0 < len(want) < b * nt * nt
  assert (np.asarray(q_tile)[int(count):] == b * nt).all()  # The rest: the scratch tile.


def test_skipped_tiles_are_never_read():
  """NaN queries, keys and values in tiles no query needs (padding at a row's start and end)
  leave every output and gradient finite and equal to the dense path's on clean inputs (the
  dense path, which multiplies them by zero weights, gives NaN). The pair list's unused slots
  point at a scratch tile, not at a real one; the gather clamps them to the batch's last tile
  (poisoned here) and they write only the scratch row, so its NaNs must not leak."""
  # Padding in the batch's first tile and its last: where an unused slot of the pair list
  # would land if it pointed at a real tile (key tile 0, or query tile B * nt - 1).
  seg = [[0] * 8 + [6] * 56, [1] * 10 + [2] * 20 + [3] * 26 + [0] * 8]
  q, k, v, cot, real, ours, dense, _, (_, _, count), _ = run(
      (2, 64, 4, 2, 8, 8, seg, None), 32)
  assert int(count) < 2 * 8 * 8  # So the list has unused slots.
  poison = (np.asarray(seg) == 0)[:, :, None, None]
  clean = (q, k, v)
  poisoned = [jnp.where(poison, jnp.nan, x) for x in clean]
  loss = lambda f: jax.jit(jax.value_and_grad(lambda *x: jnp.sum(f(*x) * cot), argnums=(0, 1, 2)))
  got_o = ours(*poisoned)
  got_value, got_grads = loss(ours)(*poisoned)
  assert np.isfinite(np.asarray(got_o)).all() and np.isfinite(float(got_value))
  assert not np.isfinite(np.where(real, dense(*poisoned), 0.0)).all()
  want_value, want_grads = loss(dense)(*clean)
  np.testing.assert_allclose(got_o * real, dense(*clean) * real, atol=2e-6)
  for got, want in zip(got_grads, want_grads):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(got[np.asarray(poison[..., 0, 0])], 0.0)
    np.testing.assert_allclose(np.where(poison, 0, got), np.where(poison, 0, want),
                               atol=2e-6 * np.abs(want).max())


def test_float64_keeps_float64():
  """x64 inputs accumulate in float64: equal to the dense float64 path far below fp32's
  rounding."""
  with jax.enable_x64():
    q, k, v, cot, real, ours, dense, *_ = run(CASES["packed_padded_gqa"], 32)
    q, k, v = (x.astype(jnp.float64) for x in (q, k, v))
    got, want = ours(q, k, v), dense(q, k, v)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got * real, want * real, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "dots"])
def test_model_with_sparse_attention_equals_dense_model(remat):
  """The whole model, attention_impl=sparse, on packed rows with padding and with shared-prompt
  branches (and under remat): hidden states at real tokens and the gradient of a loss over them
  equal the dense model's; rows that the block does not divide, and multi-device meshes, take
  the dense path."""
  cfg = model_lib.ModelConfig(vocab_size=37, hidden_size=24, num_layers=2,
                              num_attention_heads=4, num_query_groups=2, ffn_hidden_size=40,
                              max_position_embeddings=64, attention_block=8, remat=remat)
  sparse = dataclasses.replace(cfg, attention_impl="sparse")
  params = model_lib.init_params(cfg, jax.random.key(4))
  rng = np.random.default_rng(9)
  seg = jnp.asarray([[1] * 14 + [2] * 11 + [3] * 5 + [0] * 2, [4] * 32])
  pos = jnp.asarray(np.stack([np.concatenate([np.arange(14), np.arange(11), np.arange(5),
                                              [0, 0]]), np.arange(32)]))
  branch = jnp.asarray([[0] * 32, [0] * 10 + [1] * 11 + [2] * 11])
  tokens = jnp.asarray(rng.integers(0, 37, size=(2, 32)))
  real = (seg > 0)[:, :, None]
  for branch_ids in (None, branch):
    def loss(p, c):
      h = model_lib.apply(p, c, tokens, pos, seg, branch_ids_BxT=branch_ids)
      return jnp.sum(jnp.sin(h) * real), h
    (_, h_s), g_s = jax.value_and_grad(loss, has_aux=True)(params, sparse)
    (_, h_d), g_d = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    np.testing.assert_allclose(h_s * real, h_d * real, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_d)):
      np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max()))
  # LoRA's forward (adapters on every target) takes the same path.
  lcfg = lora.LoraConfig(targets=("all",), rank=2)
  adapters = jax.tree.map(lambda x: x + 0.1, lora.init(cfg, lcfg, jax.random.key(5)))
  lora_h = lambda c: lora.apply(params, adapters, c, lcfg, tokens, pos, seg)
  np.testing.assert_allclose(lora_h(sparse) * real, lora_h(cfg) * real, atol=1e-5)
  assert isinstance(model_lib.layer_mask(sparse, seg), model_lib.TilePairs)
  assert model_lib.layer_mask(sparse, seg[:, :30]).shape == (2, 1, 30, 30)  # 8 does not divide.
  # layer_mask reads the mesh's size and axis sizes only (no context axis here).
  two_devices = types.SimpleNamespace(size=2, shape={"data": 2})
  assert model_lib.layer_mask(sparse, seg, mesh=two_devices).shape == (2, 1, 32, 32)
