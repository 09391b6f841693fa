"""The stories260K fixtures (tests/testdata/stories260k) and a greedy decoder for them."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dpojax import model as model_lib
from dpojax.formats import convert_common

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "stories260k")
HF_DIR = os.path.join(DIR, "hf")
NEMO = {name: os.path.join(DIR, "nemo", f"stories260k-{name}.nemo")
        for name in ("mcore-torch_dist", "mcore-zarr", "legacy-ckpt")}
with open(os.path.join(DIR, "reference.json")) as _f:
  REFERENCE = json.load(_f)


@functools.partial(jax.jit, static_argnums=(0, 3))
def greedy(cfg, params, prompt_1xP, num_new: int):
  """Argmax decoding by a full forward over a fixed-length buffer per step (no KV cache)."""
  p = prompt_1xP.shape[1]
  t = p + num_new
  tokens_1xT = jnp.zeros((1, t), jnp.int32).at[:, :p].set(prompt_1xP)
  positions_1xT = jnp.arange(t, dtype=jnp.int32)[None]
  segments_1xT = jnp.ones((1, t), jnp.int32)  # Causal masking hides the unfilled tail.
  w_VxD = model_lib.output_weight(params, cfg)

  def step(i, tokens_1xT):
    h_1xTxD = model_lib.apply(params, cfg, tokens_1xT, positions_1xT, segments_1xT)
    h_1xD = jax.lax.dynamic_index_in_dim(h_1xTxD, p - 1 + i, axis=1, keepdims=False)
    logits_1xV = jnp.einsum("bd,vd->bv", h_1xD, w_VxD, precision="highest")
    return tokens_1xT.at[0, p + i].set(jnp.argmax(logits_1xV[0]).astype(jnp.int32))

  return jax.lax.fori_loop(0, num_new, step, tokens_1xT)[0, p:]


def generate_reference(cfg, params) -> list[int]:
  prompt = np.asarray([REFERENCE["prompt_ids"]], np.int32)
  return [int(x) for x in greedy(cfg, params, prompt, REFERENCE["max_new_tokens"])]


def random_params(cfg, seed=0) -> dict:
  """Random numpy params in the model's own tree (no init compile); biases nonzero too."""
  rng = np.random.default_rng(seed)
  dtype = convert_common.numpy_dtype(cfg.param_dtype)
  return convert_common.unflatten({
      k: rng.normal(size=shape).astype(dtype)
      for k, shape in convert_common.param_shapes(cfg).items()})


def assert_bitwise(a: dict, b: dict, where=""):
  """Same tree, shapes, dtypes and bytes."""
  assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
  for k in a:
    if isinstance(a[k], dict):
      assert_bitwise(a[k], b[k], f"{where}/{k}")
    else:
      x, y = np.asarray(a[k]), np.asarray(b[k])
      assert x.dtype == y.dtype and x.shape == y.shape, (f"{where}/{k}", x.dtype, y.dtype)
      assert x.tobytes() == y.tobytes(), f"{where}/{k} differs"
