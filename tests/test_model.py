"""The Flax model against an independent NumPy transformer, and the packing invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from dpojax import model as model_lib
from dpojax.model import lora
from dpojax.model import rope as rope_lib
from dpojax.model import transformer
from dpojax.ops import dense as dense_ops

from conftest import load_default_config

# Jitted: eager Flax dispatch op by op is far slower than one compilation.
apply = jax.jit(model_lib.apply, static_argnums=1)


def np_norm(x, p, cfg):
  if cfg.normalization in ("rmsnorm", "rmsnorm1p"):
    scale = p["scale"] + 1 if cfg.normalization == "rmsnorm1p" else p["scale"]
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.layernorm_epsilon) * scale
  mu = x.mean(-1, keepdims=True)
  y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + cfg.layernorm_epsilon)
  scale = p["scale"] + 1 if cfg.normalization == "layernorm1p" else p["scale"]
  return y * scale + p["bias"]


def np_rope(x_TxNxK, pos_T, rot, base):
  out = x_TxNxK.copy()
  half = rot // 2
  for t, p in enumerate(pos_T):
    for i in range(half):
      theta = p / base ** (2 * i / rot)
      a, b = x_TxNxK[t, :, i], x_TxNxK[t, :, i + half]
      out[t, :, i] = a * np.cos(theta) - b * np.sin(theta)
      out[t, :, i + half] = b * np.cos(theta) + a * np.sin(theta)
  return out


def np_forward(params, cfg, tokens_T, pos_T, seg_T):
  """One row, float64, loops over heads: written from the architecture's definition."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embedding"][tokens_T]
  if cfg.scale_embeddings:
    x = x * np.sqrt(cfg.hidden_size)
  if cfg.position_embedding_type == "learned_absolute":
    x = x + p["position_embedding"][pos_T]
  t = len(tokens_T)
  allowed = np.tril(np.ones((t, t), bool)) & (seg_T[:, None] == seg_T[None, :])
  per_group = cfg.num_attention_heads // cfg.groups
  gelu_tanh = lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  for l in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[l], p["layers"])
    a = lp["attention"]
    sliding = cfg.sliding_window > 0 and (
        cfg.layer_types is None or cfg.layer_types[l] == "sliding_attention")
    base = cfg.rotary_base_local if sliding and cfg.rotary_base_local else cfg.rotary_base
    # Sliding layers: keys fewer than `sliding_window` positions back, itself included.
    near = pos_T[:, None] - pos_T[None, :] < cfg.sliding_window if sliding else True
    h = np_norm(x, lp["input_norm"], cfg)
    q = np.einsum("td,dnk->tnk", h, a["query"])
    k = np.einsum("td,dgk->tgk", h, a["key"])
    v = np.einsum("td,dgk->tgk", h, a["value"])
    if cfg.bias or cfg.qkv_bias:
      q, k, v = q + a["query_bias"], k + a["key_bias"], v + a["value_bias"]
    if cfg.qk_norm:
      q, k = np_norm(q, a["query_norm"], cfg), np_norm(k, a["key_norm"], cfg)
    if cfg.position_embedding_type == "rope":
      q = np_rope(q, pos_T, cfg.rotary_dim, base)
      k = np_rope(k, pos_T, cfg.rotary_dim, base)
    o = np.zeros_like(q)
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    for n in range(cfg.num_attention_heads):
      g = n // per_group
      s = q[:, n] @ k[:, g].T * scale
      if cfg.attention_softcap:
        s = cfg.attention_softcap * np.tanh(s / cfg.attention_softcap)
      s = np.where(allowed & near, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      o[:, n] = (w / w.sum(-1, keepdims=True)) @ v[:, g]
    y = np.einsum("tnk,nkd->td", o, a["out"])
    y = y + a["out_bias"] if cfg.bias else y
    x = x + (np_norm(y, lp["post_attention_norm"], cfg) if cfg.post_norms else y)
    m = lp["mlp"]
    h = np_norm(x, lp["pre_mlp_norm"], cfg)
    if cfg.activation in ("swiglu", "geglu"):
      u = np.einsum("td,dcf->tcf", h, m["fc1"]) + (m["fc1_bias"] if cfg.bias else 0)
      gate = u[:, 0] / (1 + np.exp(-u[:, 0])) if cfg.activation == "swiglu" else gelu_tanh(u[:, 0])
      act = gate * u[:, 1]
    else:
      u = h @ m["fc1"] + (m["fc1_bias"] if cfg.bias else 0)
      if cfg.activation == "gelu":
        act = 0.5 * u * (1 + erf(u / np.sqrt(2)))
      elif cfg.activation == "gelu_tanh":
        act = gelu_tanh(u)
      else:
        act = np.maximum(u, 0) ** 2
    y = act @ m["fc2"] + (m["fc2_bias"] if cfg.bias else 0)
    x = x + (np_norm(y, lp["post_mlp_norm"], cfg) if cfg.post_norms else y)
  return np_norm(x, p["final_norm"], cfg)


BASE = model_lib.ModelConfig(vocab_size=37, hidden_size=24, num_layers=2, num_attention_heads=4,
                             num_query_groups=None, ffn_hidden_size=40,
                             max_position_embeddings=32, attention_block=0, scan_unroll=1)
# The Hugging Face families' options (issue 22); windows of 3 are shorter than the packed
# sequences of 6 and 4 tokens, softcaps small enough to bend the logits of random weights.
FAMILIES = {
    "qwen2_qkv_bias_all_sliding": dict(num_query_groups=2, qkv_bias=True, sliding_window=3),
    "qwen3_qk_norm_head_dim_8": dict(num_query_groups=2, kv_channels=8, qk_norm=True),
    "gemma2": dict(num_query_groups=2, normalization="rmsnorm1p", activation="geglu",
                   scale_embeddings=True, query_pre_attn_scalar=16.0, attention_softcap=0.5,
                   post_norms=True, sliding_window=3,
                   layer_types=("sliding_attention", "full_attention")),
    "gemma3": dict(num_query_groups=1, kv_channels=8, normalization="rmsnorm1p",
                   activation="geglu", scale_embeddings=True, qk_norm=True, post_norms=True,
                   sliding_window=3, layer_types=("full_attention", "sliding_attention"),
                   rotary_base=1000.0, rotary_base_local=10.0),
}
VARIANTS = {
    "llama_gqa": dict(num_query_groups=2),
    "mqa_partial_rope": dict(num_query_groups=1, kv_channels=8, rotary_percentage=0.5,
                             rotary_base=500.0),
    "gpt_gelu_layernorm_bias": dict(activation="gelu", normalization="layernorm", bias=True,
                                    position_embedding_type="learned_absolute",
                                    share_embeddings_and_output_weights=False),
    "nemo_sqrelu_layernorm1p": dict(activation="squared_relu", normalization="layernorm1p",
                                    kv_channels=8),
    "gelu_tanh_remat": dict(activation="gelu_tanh", remat="full"),
    **FAMILIES,
}


def randomize(params, seed):
  """Non-trivial norms and biases (init leaves them at 1/0, which would hide bugs)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(x + 0.1 * rng.normal(size=x.shape), jnp.float32), params)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_numpy_reference(name):
  cfg = dataclasses.replace(BASE, **VARIANTS[name])
  params = randomize(model_lib.init_params(cfg, jax.random.key(0)), 1)
  rng = np.random.default_rng(2)
  t = 10
  tokens = rng.integers(0, cfg.vocab_size, size=(1, t))
  seg = np.array([[1] * 6 + [2] * 4])  # Two packed sequences.
  pos = np.array([list(range(6)) + list(range(4))])
  hidden = apply(params, cfg, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
  expected = np_forward(params, cfg, tokens[0], pos[0], seg[0])
  np.testing.assert_allclose(np.asarray(hidden[0]), expected, rtol=2e-4, atol=2e-4)
  out = model_lib.output_weight(params, cfg)
  assert out.shape == (cfg.vocab_size, cfg.hidden_size)
  assert (out is params["embedding"]) == cfg.share_embeddings_and_output_weights


def test_packed_row_equals_separate_rows():
  cfg = dataclasses.replace(BASE, num_query_groups=2)
  params = model_lib.init_params(cfg, jax.random.key(3))
  rng = np.random.default_rng(4)
  a, b = rng.integers(0, 37, size=7), rng.integers(0, 37, size=5)
  packed = apply(
      params, cfg, jnp.asarray(np.concatenate([a, b, [0, 0]]))[None],
      jnp.asarray(list(range(7)) + list(range(5)) + [0, 0])[None],
      jnp.asarray([1] * 7 + [2] * 5 + [0, 0])[None])
  alone_a = apply(params, cfg, jnp.asarray(a)[None], jnp.arange(7)[None],
                            jnp.ones((1, 7), jnp.int32))
  alone_b = apply(params, cfg, jnp.asarray(b)[None], jnp.arange(5)[None],
                            jnp.ones((1, 5), jnp.int32))
  np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 7:12], alone_b[0], atol=1e-5)


def test_shared_prompt_branches_equal_separate_sequences():
  """A row [prompt[:-1] | prompt[-1] a | prompt[-1] b] with branch ids 0 | 1 | 2 gives each
  branch the hidden states of prompt + a and prompt + b run alone (mask checked by a loop)."""
  cfg = dataclasses.replace(BASE, num_query_groups=2, attention_block=4)
  params = model_lib.init_params(cfg, jax.random.key(3))
  rng = np.random.default_rng(6)
  p, a, b = (rng.integers(0, 37, size=n) for n in (5, 4, 3))
  tokens = np.concatenate([p, a, p[-1:], b, [0]])[None]
  pos = np.concatenate([np.arange(9), np.arange(4, 8), [0]])[None]
  branch = np.asarray([0] * 4 + [1] * 5 + [2] * 4 + [0])[None]
  seg = np.asarray([1] * 13 + [0])[None]
  mask = np.asarray(model_lib.attention_mask(jnp.asarray(seg), jnp.asarray(branch)))[0, 0]
  for i in range(14):
    for j in range(14):
      want = j <= i and seg[0, i] == seg[0, j] and branch[0, j] in (0, branch[0, i])
      assert mask[i, j] == want, (i, j)
  shared = apply(params, cfg, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg),
                 jnp.asarray(branch))
  for branch_tokens, cols in ((a, slice(4, 9)), (b, slice(9, 13))):
    seq = np.concatenate([p, branch_tokens])[None]
    alone = apply(params, cfg, jnp.asarray(seq), jnp.arange(seq.shape[1])[None],
                  jnp.ones_like(jnp.asarray(seq)))
    np.testing.assert_allclose(shared[0, cols], alone[0, 4:], atol=1e-5)
  np.testing.assert_allclose(shared[0, :4], alone[0, :4], atol=1e-5)


@pytest.mark.slow
def test_tiled_causal_attention_equals_one_block():
  """attention_block: query tiles that skip the keys after them give the dense result, on a
  packed row with padding; a length the tile does not divide falls back to one block."""
  cfg = dataclasses.replace(BASE, num_query_groups=2)
  tiled = dataclasses.replace(cfg, attention_block=4)
  params = model_lib.init_params(cfg, jax.random.key(3))
  rng = np.random.default_rng(5)
  seg = np.asarray([1] * 6 + [2] * 7 + [3] * 5 + [0] * 2)[None]
  pos = np.concatenate([np.arange(6), np.arange(7), np.arange(5), [0, 0]])[None]
  tokens = jnp.asarray(rng.integers(0, 37, size=(1, 20)))
  np.testing.assert_allclose(apply(params, tiled, tokens, pos, seg),
                             apply(params, cfg, tokens, pos, seg), atol=1e-6)
  q = jnp.asarray(rng.normal(size=(2, 20, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32) for _ in range(2))
  mask = model_lib.attention_mask(jnp.asarray(np.repeat(seg, 2, 0)))
  dense = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  for block in (4, 5, 7):  # 7 does not divide 20: one block.
    np.testing.assert_allclose(model_lib.attend(q, k, v, mask, block), dense, atol=1e-6)

@pytest.mark.parametrize("block", [0, 4])
def test_attention_values_and_gradients_match_jax_autodiff(block):
  """attend's own backward pass (fp32 and up) against autodiff of
  jax.nn.dot_product_attention: GQA, a packed row with padding, dense and tiled."""
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.normal(size=(2, 20, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32) for _ in range(2))
  seg = np.asarray([[1] * 6 + [2] * 9 + [3] * 3 + [0] * 2, [1] * 20])
  mask = model_lib.attention_mask(jnp.asarray(seg))
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  ours = lambda q, k, v: jnp.sum(model_lib.attend(q, k, v, mask, block) * cot)
  theirs = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
      q, k, v, mask=mask, implementation="xla") * cot)
  got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.abs(np.asarray(w)).max() > 0.1
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swiglu_gradient_matches_autodiff(dtype, tol):
  """swiglu's own backward (d[gate; up] in one pass) against autodiff of the two slices,
  computed in float64: values, and gradients at both halves of fc1's output."""
  rng = np.random.default_rng(3)
  h = rng.normal(scale=3.0, size=(2, 5, 2, 7))
  dy = rng.normal(size=(2, 5, 7))
  reference = lambda h: jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
  with jax.enable_x64():
    want_y, pull = jax.vjp(reference, jnp.asarray(h, jnp.float64))
    want_dh = pull(jnp.asarray(dy, jnp.float64))[0]
  got_y, pull = jax.vjp(dense_ops.swiglu, jnp.asarray(h, dtype))
  got_dh = pull(jnp.asarray(dy, dtype))[0]
  assert got_dh.shape == h.shape and got_dh.dtype == dtype
  for got, want in ((got_y, want_y), (got_dh, want_dh)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               atol=tol * np.abs(want).max(), rtol=tol)


def test_dense_gradient_matches_einsum_autodiff():
  """dense's own backward (two 2-D products) against autodiff of the einsum it replaces, in
  float64: fc1's [D, 2, F] weight (one contracted axis) and the output projection's
  [N, K, D] (two)."""
  rng = np.random.default_rng(11)
  cases = [("btd,dcf->btcf", (2, 5, 6), (6, 2, 3), 1), ("btnk,nkd->btd", (2, 5, 4, 3), (4, 3, 6), 2)]
  with jax.enable_x64():
    for spec, x_shape, w_shape, contract in cases:
      x, w = (jnp.asarray(rng.normal(size=s), jnp.float64) for s in (x_shape, w_shape))
      y = jnp.einsum(spec, x, w)
      cot = jnp.asarray(rng.normal(size=y.shape), jnp.float64)
      got_y, pull = jax.vjp(lambda x, w: dense_ops.dense(x, w, contract), x, w)
      want_dx, want_dw = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)[1](cot)
      np.testing.assert_allclose(got_y, y, rtol=1e-12)
      for got, want in zip(pull(cot), (want_dx, want_dw)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_rope_table_gathered_equals_computed():
  """The trace-time table (training rows) gives the angles computed per position bit for
  bit."""
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 64)), jnp.int32)
  for dim, base in ((8, 10000.0), (16, 500000.0)):
    computed = jax.jit(lambda p: rope_lib.rope_table(p, dim, base, jnp.float32))(pos)
    gathered = jax.jit(lambda p: rope_lib.rope_table(p, dim, base, jnp.float32, 64))(pos)
    for c, g in zip(computed, gathered):
      assert c.shape == (3, 64, 1, dim)
      np.testing.assert_array_equal(g, c)


@pytest.mark.slow
def test_unrolled_layer_scan_gives_the_same_model():
  """scan_unroll only changes how XLA sees the layers: hidden states and parameter
  gradients equal the rolled scan's, for the base model and through LoRA adapters."""
  cfg = dataclasses.replace(BASE, num_query_groups=2, num_layers=3)
  params = randomize(model_lib.init_params(cfg, jax.random.key(8)), 2)
  lcfg = lora.LoraConfig(targets=("all",), rank=2, alpha=4.0, dropout=0.0)
  adapters = jax.tree.map(lambda a: a + 0.05, lora.init(cfg, lcfg, jax.random.key(9)))
  tokens = jnp.arange(12)[None] % 37
  pos, seg = jnp.arange(12)[None], jnp.ones((1, 12), jnp.int32)

  def run(unroll):
    c = dataclasses.replace(cfg, scan_unroll=unroll)
    hidden = lambda p, a: lora.apply(p, a, c, lcfg, tokens, pos, seg)
    loss = lambda p, a: jnp.sum(jnp.sin(hidden(p, a)))
    return jax.jit(lambda p, a: (hidden(p, None), jax.grad(loss, argnums=(0, 1))(p, a)))(
        params, adapters)

  rolled, unrolled = run(1), run(3)
  for r, u in zip(jax.tree.leaves(rolled), jax.tree.leaves(unrolled)):  # fp32 sums reorder.
    np.testing.assert_allclose(u, r, atol=1e-6 * np.abs(r).max(), rtol=1e-5)
  assert np.abs(jax.tree.leaves(rolled[1][0])[0]).max() > 0


@pytest.mark.slow  # Keeps `-m "not slow"` under 3 minutes.
def test_flash_model_equals_dense_model_and_keeps_dense_for_branches():
  """A packed batch through the whole model with attention_impl=flash gives the dense
  model's hidden states; shared-prompt branch masks still take the dense path."""
  cfg = dataclasses.replace(BASE, num_query_groups=2, kv_channels=16)
  flash = dataclasses.replace(cfg, attention_impl="flash")
  params = model_lib.init_params(cfg, jax.random.key(4))
  rng = np.random.default_rng(9)
  seg = jnp.asarray([[1] * 6 + [2] * 7 + [3] * 5 + [0] * 2])
  pos = jnp.asarray(np.concatenate([np.arange(6), np.arange(7), np.arange(5), [0, 0]])[None])
  tokens = jnp.asarray(rng.integers(0, 37, size=(1, 20)))
  np.testing.assert_allclose(apply(params, flash, tokens, pos, seg),
                             apply(params, cfg, tokens, pos, seg), atol=1e-5)
  assert isinstance(model_lib.layer_mask(flash, seg), model_lib.Segments)
  assert model_lib.layer_mask(flash, seg, jnp.zeros_like(seg)).shape == (1, 1, 20, 20)
  # auto: the dense path off GPU (the kernel only runs interpreted there).
  assert model_lib.layer_mask(cfg, seg).shape == (1, 1, 20, 20) and cfg.attention_impl == "auto"
  with pytest.raises(ValueError, match="attention_impl"):
    dataclasses.replace(cfg, attention_impl="cudnn")


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = dataclasses.replace(BASE, num_query_groups=2)
  mha = dataclasses.replace(BASE, num_query_groups=None)
  p = model_lib.init_params(gqa, jax.random.key(5))
  q = jax.tree.map(lambda x: x, p)
  for name in ("key", "value"):  # [L, D, G, K] -> [L, D, N, K], each group serving 2 heads.
    q["layers"]["attention"][name] = jnp.repeat(p["layers"]["attention"][name], 2, axis=2)
  tokens = jnp.arange(9)[None] % 37
  pos, seg = jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32)
  np.testing.assert_allclose(apply(p, gqa, tokens, pos, seg),
                             apply(q, mha, tokens, pos, seg), atol=1e-5)


def test_bfloat16_compute_stays_close():
  cfg = dataclasses.replace(BASE, num_query_groups=2)
  p = model_lib.init_params(cfg, jax.random.key(6))
  tokens = jnp.arange(9)[None] % 37
  pos, seg = jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32)
  h32 = apply(p, cfg, tokens, pos, seg)
  h16 = apply(p, dataclasses.replace(cfg, dtype="bfloat16"), tokens, pos, seg)
  assert h16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(h16, np.float32), h32, atol=0.1)


@pytest.mark.parametrize("bad,key", [
    (dict(activation="relu6"), "model.activation"),
    (dict(num_query_groups=3), "model.num_query_groups"),
    (dict(normalization="batchnorm"), "model.normalization"),
    (dict(scan_unroll=0), "model.scan_unroll"),
])
def test_config_errors_name_the_key(bad, key):
  with pytest.raises(ValueError, match=key):
    dataclasses.replace(BASE, **bad)


def test_model_config_defaults_are_the_config_files():
  """configs/dpo_gpt.py is the one source of defaults: each `model.*` key there equals the
  dataclass default, and every dataclass field has its key."""
  section = load_default_config().model.to_dict()
  defaults = {f.name: f.default for f in dataclasses.fields(model_lib.ModelConfig)}
  assert set(section) == set(defaults)
  for name, default in defaults.items():
    if dataclasses.is_dataclass(default):  # model.moe: a section of its own.
      default = dataclasses.asdict(default)
    assert section[name] == default, name


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_option_changes_the_model(name):
  """The NumPy reference with any one option of a family switched back off disagrees with
  the model by far more than the tolerance above: each option is really exercised."""
  cfg = dataclasses.replace(BASE, **FAMILIES[name])
  params = randomize(model_lib.init_params(cfg, jax.random.key(0)), 1)
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=10)
  seg, pos = np.array([1] * 6 + [2] * 4), np.array(list(range(6)) + list(range(4)))
  hidden = np.asarray(apply(params, cfg, jnp.asarray(tokens)[None], jnp.asarray(pos)[None],
                            jnp.asarray(seg)[None])[0])
  off = {"qkv_bias": False, "qk_norm": False, "post_norms": False, "scale_embeddings": False,
         "query_pre_attn_scalar": None, "attention_softcap": 0.0, "sliding_window": 0,
         "layer_types": None, "rotary_base_local": None, "normalization": "rmsnorm",
         "activation": "swiglu"}
  for key in FAMILIES[name]:
    if key not in off:
      continue
    other = dataclasses.replace(cfg, **{key: off[key]})
    diff = np.abs(np_forward(params, other, tokens, pos, seg) - hidden).max()
    assert diff > 1e-2, (key, diff)


@pytest.mark.slow
def test_sliding_window_masks_equal_a_loop_in_every_path():
  """The windowed mask against a loop over (query, key), on a packed row and a shared-prompt
  row; the tiled, block-sparse and flash paths (the last two skip tiles outside the window)
  equal the dense path in values and gradients."""
  rng = np.random.default_rng(12)
  seg = np.asarray([[1] * 6 + [2] * 7 + [3] * 5 + [0] * 2,
                    [1] * 13 + [0] * 7])
  pos = np.asarray([list(range(6)) + list(range(7)) + list(range(5)) + [0, 0],
                    list(range(5)) + list(range(5, 9)) + list(range(5, 9)) + [0] * 7])
  branch = np.asarray([[0] * 20, [0] * 5 + [1] * 4 + [2] * 4 + [0] * 7])
  window = 3
  mask = np.asarray(model_lib.attention_mask(jnp.asarray(seg), jnp.asarray(branch),
                                             jnp.asarray(pos), window))[:, 0]
  for b in range(2):
    for i in range(20):
      for j in range(20):
        want = (j <= i and seg[b, i] == seg[b, j] and branch[b, j] in (0, branch[b, i])
                and pos[b, i] - pos[b, j] < window)
        assert mask[b, i, j] == want, (b, i, j)
  cfg = dataclasses.replace(BASE, num_query_groups=2, sliding_window=window, attention_block=4)
  params = randomize(model_lib.init_params(cfg, jax.random.key(3)), 4)
  tokens = jnp.asarray(rng.integers(0, 37, size=(1, 20)))
  # Real tokens only: padding attends to nothing on the block-sparse path.
  row = lambda c: jax.jit(lambda p: model_lib.apply(p, c, tokens, pos[:1], seg[:1])[:, :18])
  dense = dataclasses.replace(cfg, attention_impl="xla", attention_block=0)
  sparse = dataclasses.replace(cfg, attention_impl="sparse")
  assert isinstance(model_lib.layer_mask(sparse, jnp.asarray(seg[:1]), None, None,
                                         jnp.asarray(pos[:1])), model_lib.TilePairs)
  loss = lambda c: jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(model_lib.apply(
      p, c, tokens, pos[:1], seg[:1])[:, :18]))))
  want = loss(dense)(params)
  flash = dataclasses.replace(cfg, attention_impl="flash")  # Interpreted off GPU.
  for c in (cfg, sparse, flash):  # Tiled dense, block-sparse, the flash kernel.
    np.testing.assert_allclose(row(c)(params), row(dense)(params), atol=1e-5)
    got = loss(c)(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_softcapped_scaled_attention_gradients_match_autodiff():
  """attend's own backward through a logit softcap and a custom scale (fp32, dense and
  tiled) against autodiff of the formula; bf16 takes the fp32-logit path."""
  rng = np.random.default_rng(13)
  q = jnp.asarray(rng.normal(size=(2, 20, 4, 8)), jnp.float32) * 2
  k, v = (jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32) for _ in range(2))
  seg = np.asarray([[1] * 6 + [2] * 9 + [3] * 3 + [0] * 2, [1] * 20])
  mask = model_lib.attention_mask(jnp.asarray(seg))
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  cap, scale = 1.5, 0.3

  def formula(q, k, v):
    kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum("btnk,bsnk->bnts", q, kk) * scale
    logits = jnp.where(mask, cap * jnp.tanh(logits / cap), -jnp.inf)
    return jnp.einsum("bnts,bsnk->btnk", jax.nn.softmax(logits, -1), vv)

  want = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(formula(*a) * cot), (0, 1, 2)))(q, k, v)
  plain = jnp.sum(model_lib.attend(q, k, v, mask) * cot)
  assert abs(float(plain) - float(want[0])) > 0.1  # The cap and scale matter here.
  for block in (0, 4):
    got = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(model_lib.attend(
        q, k, v, mask, block, scale, cap) * cot), (0, 1, 2)))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
  half = model_lib.attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                          v.astype(jnp.bfloat16), mask, 0, scale, cap)
  np.testing.assert_allclose(np.asarray(half, np.float32), formula(q, k, v), atol=5e-2)


def test_cached_decoding_with_sliding_layers_equals_the_full_forward():
  """Gemma-style local/global layers: a prompt then one token at a time through the KV cache
  (past the window) gives the hidden states of one forward over the whole sequence."""
  cfg = dataclasses.replace(BASE, **FAMILIES["gemma2"])
  params = randomize(model_lib.init_params(cfg, jax.random.key(5)), 6)
  tokens = jnp.asarray(np.random.default_rng(14).integers(1, 37, size=(1, 9)))
  full = model_lib.apply(params, cfg, tokens, jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32))
  cache = transformer.init_cache(cfg, 1, 12)
  step = jax.jit(lambda c, t, p: transformer.decode(params, cfg, c, t, p, jnp.ones_like(t)))
  h, cache = step(cache, tokens[:, :4], jnp.arange(4)[None])
  outs = [h]
  for i in range(4, 9):
    h, cache = step(cache, tokens[:, i:i + 1], jnp.asarray([[i]]))
    outs.append(h)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("kind,extra", [
    ("linear", dict(factor=4.0)),
    ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)),
    ("dynamic", dict(factor=4.0)),  # Equal to none up to max_position_embeddings.
    ("yarn", dict(factor=4.0, original_max_position_embeddings=128)),
    ("yarn", dict(factor=8.0, original_max_position_embeddings=64, beta_fast=16.0,
                  beta_slow=2.0, truncate=False)),
])
def test_rope_scaling_frequencies_equal_transformers(kind, extra):
  """linear, llama3 and yarn RoPE scaling give transformers' own inverse frequencies and
  attention factor (its ROPE_INIT_FUNCTIONS, the oracle), and the model's angles use them."""
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top
  hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=10000.0,
                                max_position_embeddings=512,
                                rope_scaling={"rope_type": kind, **extra})
  want, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
  # yarn's factor with no mscale: 0.1 ln(factor) + 1 (its formula, by hand).
  assert attention_factor == (0.1 * np.log(extra["factor"]) + 1 if kind == "yarn" else 1.0)
  cfg = dataclasses.replace(
      BASE, hidden_size=64, num_attention_heads=2, rope_scaling=kind,
      rope_scaling_factor=extra["factor"],
      rope_low_freq_factor=extra.get("low_freq_factor", 1.0),
      rope_high_freq_factor=extra.get("high_freq_factor", 4.0),
      rope_original_max_positions=extra.get("original_max_position_embeddings", 8192),
      rope_attention_factor=float(attention_factor),
      rope_yarn_beta_fast=extra.get("beta_fast", 32.0),
      rope_yarn_beta_slow=extra.get("beta_slow", 1.0), rope_yarn_truncate=extra.get("truncate", True))
  base = 1.0 / (10000.0 ** (jnp.arange(0, 32, 2, dtype=jnp.float32) / 32))
  got = np.asarray(rope_lib.scale_frequencies(base, cfg, 10000.0))
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  if kind != "dynamic":
    assert np.abs(got - np.asarray(base)).max() > 1e-3  # The scaling moves some frequencies.
  cos, _ = rope_lib.rope_table(jnp.arange(40)[None], 32, 10000.0, jnp.float32, None, cfg)
  np.testing.assert_allclose(np.asarray(cos[0, :, 0, :16]), attention_factor * np.cos(
      np.arange(40)[:, None] * want.numpy()[None]), atol=1e-5)
