"""ops/grouped.py: the grouped matmuls against a per-expert loop, and benchmarks/moe_layer.py
at a tiny size."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpojax.ops import grouped

from conftest import ROOT


@pytest.mark.parametrize("impl,tile", [("tiles", 4), ("tiles", 16), ("scan", 4), ("scan", 16),
                                       ("ragged", 0)])
def test_grouped_matmul_and_its_gradient_equal_a_loop_over_experts(impl, tile):
  """Uneven groups (one empty), and 5 trailing rows past the groups that must give zeros."""
  rng = np.random.default_rng(0)
  sizes = np.array([3, 0, 9, 1, 6], np.int32)
  rows = int(sizes.sum()) + 5
  x = jnp.asarray(rng.normal(size=(rows, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 6, 7)), jnp.float32)
  ends = np.cumsum(sizes)

  def loop(x, w):
    out = [x[e0:e1] @ w[e] for e, (e0, e1) in enumerate(zip(ends - sizes, ends))]
    return jnp.concatenate(out + [jnp.zeros((5, 7))])

  got = grouped.grouped_matmul(x, w, jnp.asarray(sizes), impl, tile)
  np.testing.assert_allclose(got, loop(x, w), rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(got[-5:]))
  f = lambda fn: jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)
  for a, b in zip(f(lambda x, w: grouped.grouped_matmul(x, w, jnp.asarray(sizes), impl, tile)),
                  f(loop)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sort_and_combine_give_each_token_its_weighted_experts():
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, 4, (7, 2)), jnp.int32)
  weights = jnp.asarray(rng.random((7, 2)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  scale = jnp.arange(1.0, 5.0)  # "Expert" e multiplies by e + 1.
  order, sizes = grouped.sort_by_expert(ids, 4)
  assert sizes.tolist() == np.bincount(np.asarray(ids).ravel(), minlength=4).tolist()
  sorted_ids = ids.reshape(-1)[order]
  assert np.all(np.diff(np.asarray(sorted_ids)) >= 0)
  y = grouped.gather_sorted(x, order, 2) * scale[sorted_ids][:, None]
  want = sum(weights[:, j:j + 1] * x * scale[ids[:, j]][:, None] for j in range(2))
  np.testing.assert_allclose(grouped.combine(y, order, weights), want, rtol=1e-6)


@pytest.mark.slow
def test_moe_layer_benchmark_runs_tiny():
  out = subprocess.run(
      [sys.executable, "benchmarks/moe_layer.py", "--tokens=64", "--hidden=16", "--ffn=8",
       "--repeats=1", "--impls=tiles,scan,ragged", "--tile=8"], cwd=ROOT, check=True,
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT)).stdout
  assert "MoE (tiles)" in out and "MoE (scan)" in out and "MoE (ragged)" in out and "x dense" in out
