"""dpojax.formats.hf: the real stories260K Llama folder, round trips, transformers parity."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from safetensors.numpy import load_file

from dpojax import model as model_lib
from dpojax.formats import hf, nemo
from dpojax.formats.convert_common import CheckpointError
import stories260k as S


@pytest.fixture(scope="module")
def stories():
  return hf.load_hf(S.HF_DIR)


def test_folder_generates_reference_greedy_tokens(stories):
  cfg, params, tokenizer = stories
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads,
          cfg.groups, cfg.head_dim, cfg.ffn_hidden_size, cfg.max_position_embeddings) == (
              512, 64, 5, 8, 4, 8, 172, 512)
  assert (cfg.share_embeddings_and_output_weights, cfg.bias, cfg.rotary_base,
          cfg.layernorm_epsilon, cfg.param_dtype) == (True, False, 10000.0, 1e-5, "float32")
  assert S.generate_reference(cfg, params) == S.REFERENCE["greedy_ids"]
  # Negative control: [up; gate] instead of [gate; up] breaks the story at once.
  mlp = params["layers"]["mlp"]
  swapped = {**params, "layers": {**params["layers"], "mlp": {
      **mlp, "fc1": np.ascontiguousarray(mlp["fc1"][:, :, ::-1])}}}
  ids = S.generate_reference(cfg, swapped)
  assert sum(a == b for a, b in zip(ids, S.REFERENCE["greedy_ids"])) < 8
  assert tokenizer == os.path.join(S.HF_DIR, "tokenizer.model")
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  assert [sp.bos_id()] + sp.encode("Once upon a time") == S.REFERENCE["once_upon_a_time_ids"]


def test_import_export_import_is_bitwise_and_byte_identical_tensors(stories, tmp_path):
  out = str(tmp_path / "hf")
  hf.save_hf(out, *stories)
  cfg, params, tokenizer = hf.load_hf(out)
  assert cfg == stories.config
  S.assert_bitwise(params, stories.params)
  # Same tensor names and bytes as the independent conversion that made the fixture.
  ours, theirs = load_file(os.path.join(out, hf.SINGLE)), load_file(
      os.path.join(S.HF_DIR, hf.SINGLE))
  assert ours.keys() == theirs.keys()
  for k in theirs:
    assert ours[k].dtype == theirs[k].dtype and ours[k].tobytes() == theirs[k].tobytes(), k
  with open(os.path.join(out, hf.CONFIG)) as f:
    config = json.load(f)
  with open(os.path.join(S.HF_DIR, hf.CONFIG)) as f:
    fixture = json.load(f)
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
    assert config[key] == fixture[key], key
  assert open(tokenizer, "rb").read() == open(stories.tokenizer_path, "rb").read()


def test_nemo_import_exports_the_same_hf_tensors(tmp_path):
  out = str(tmp_path / "hf")
  hf.save_hf(out, *nemo.load_nemo(S.NEMO["mcore-zarr"]))
  ours, theirs = load_file(os.path.join(out, hf.SINGLE)), load_file(
      os.path.join(S.HF_DIR, hf.SINGLE))
  assert ours.keys() == theirs.keys()
  assert all(ours[k].tobytes() == theirs[k].tobytes() for k in theirs)


CONFIG = model_lib.ModelConfig(
    vocab_size=48, hidden_size=24, num_layers=2, num_attention_heads=4, num_query_groups=2,
    kv_channels=8, ffn_hidden_size=20, bias=True, share_embeddings_and_output_weights=False,
    rotary_base=500.0, max_position_embeddings=64, layernorm_epsilon=1e-6)


def test_sharded_untied_biased_bf16_round_trip(tmp_path):
  cfg = model_lib.ModelConfig(**{**CONFIG.__dict__, "param_dtype": "bfloat16",
                                 "num_query_groups": None})
  params = S.random_params(cfg)
  out = str(tmp_path / "hf")
  hf.save_hf(out, cfg, params, max_shard_bytes=4000)
  with open(os.path.join(out, hf.INDEX)) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not os.path.exists(os.path.join(out, hf.SINGLE))
  assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == files
  cfg2, params2, tokenizer = hf.load_hf(out)
  assert cfg2 == cfg and tokenizer is None
  S.assert_bitwise(params2, params)
  # A non-empty folder is replaced whole, and only when asked.
  with pytest.raises(CheckpointError, match="exists and is not an empty folder"):
    hf.save_hf(out, cfg, params)
  hf.save_hf(out, cfg, params, overwrite=True)  # One file now: the old shards are gone.
  assert sorted(os.listdir(out)) == [hf.CONFIG, hf.SINGLE]
  S.assert_bitwise(hf.load_hf(out).params, params)
  assert [n for n in os.listdir(tmp_path) if n != "hf"] == []  # No staging folders left.


@functools.partial(jax.jit, static_argnums=0)
def logits(cfg, params, tokens_BxT):
  b, t = tokens_BxT.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  h_BxTxD = model_lib.apply(params, cfg, tokens_BxT, positions, jnp.ones_like(tokens_BxT))
  return jnp.einsum("btd,vd->btv", h_BxTxD, model_lib.output_weight(params, cfg),
                    precision="highest")


def test_logits_match_transformers_llama(stories, tmp_path):
  """Against LlamaForCausalLM in float64 (the exact answer) and in float32; and our own
  forward in float64 against its float64, within 1e-5 absolute.

  Our fp32 logits are within 2e-6 of the logit scale (max |logit| about 22, so about 4e-5
  absolute): HF's own fp32 run is 1.2e-5 from its fp64 one, and its eager and sdpa paths differ
  by 2e-5, so an absolute 1e-5 bound would test rounding, not the conversion (a wrong QKV,
  gate/up or RoPE layout is off by about 20).
  """
  transformers = pytest.importorskip("transformers")
  import torch  # pylint: disable=g-import-not-at-top

  random_dir = str(tmp_path / "random")  # Untied, biased, GQA, head_dim != hidden/heads.
  random_params = S.random_params(CONFIG, seed=1)
  random_params = jax.tree.map(lambda x: (x * 0.3).astype(x.dtype), random_params)
  hf.save_hf(random_dir, CONFIG, random_params)
  rng = np.random.default_rng(0)
  cases = [(S.HF_DIR, stories.config, stories.params, [1] + S.REFERENCE["greedy_ids"]),
           (random_dir, CONFIG, random_params, list(rng.integers(0, 48, 40)))]
  for folder, cfg, params, ids in cases:
    tokens = np.stack([ids, rng.integers(0, cfg.vocab_size, len(ids))]).astype(np.int32)
    ours = np.asarray(logits(cfg, params, tokens))
    model = transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
      fp32 = model(torch.from_numpy(tokens).long()).logits.numpy()
      fp64 = model.double()(torch.from_numpy(tokens).long()).logits.numpy()
    scale = np.abs(fp64).max()
    assert scale > 1.0
    assert np.abs(ours - fp64).max() <= 2e-6 * scale, (folder, np.abs(ours - fp64).max())
    assert np.abs(ours - fp32).max() <= 2e-6 * scale, (folder, np.abs(ours - fp32).max())
    assert (ours.argmax(-1) == fp64.argmax(-1)).mean() == 1.0
    # The same forward in float64 (x64): the conversion is exact, within 1e-5 absolute.
    with jax.enable_x64(True):
      cfg64 = dataclasses.replace(cfg, dtype="float64", param_dtype="float64")
      ours64 = np.asarray(logits(cfg64, jax.tree.map(lambda x: np.asarray(x, np.float64),
                                                     params), tokens))
    assert ours64.dtype == np.float64
    print(f"{os.path.basename(folder)}: max |logit diff| fp32 {np.abs(ours - fp32).max():.2e}, "
          f"ours fp32 vs HF fp64 {np.abs(ours - fp64).max():.2e}, HF fp32 vs fp64 "
          f"{np.abs(fp32 - fp64).max():.2e}, "
          f"fp64 {np.abs(ours64 - fp64).max():.2e} (scale {scale:.1f})")
    assert np.abs(ours64 - fp64).max() <= 1e-5, (folder, np.abs(ours64 - fp64).max())


def test_errors_name_file_line_and_field(stories, tmp_path):
  folder = tmp_path / "bad"
  shutil.copytree(S.HF_DIR, folder)
  config_path = folder / hf.CONFIG
  text = config_path.read_text()
  config_path.write_text(text.replace('"model_type": "llama"', '"model_type": "gpt2"'))
  line = config_path.read_text().splitlines().index('  "model_type": "gpt2",') + 1
  with pytest.raises(CheckpointError, match=rf"{config_path}:{line}: model_type: 'gpt2'"):
    hf.load_hf(str(folder))
  scaled = json.loads(text)
  scaled["rope_scaling"] = {"rope_type": "longrope", "factor": 8.0}
  config_path.write_text(json.dumps(scaled, indent=2))
  with pytest.raises(CheckpointError, match=r"rope_scaling: rope_type 'longrope' is not"):
    hf.load_hf(str(folder))
  config_path.write_text(text)
  tensors = load_file(str(folder / hf.SINGLE))
  del tensors["model.layers.3.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
  tensors["model.norm.weight"] = np.ones(63, np.float32)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(tensors, str(folder / hf.SINGLE))
  with pytest.raises(CheckpointError) as e:
    hf.load_hf(str(folder))
  msg = str(e.value)
  assert str(folder / hf.SINGLE) in msg
  assert "missing tensors: model.layers.3.mlp.up_proj.weight" in msg
  assert "unexpected tensors: model.layers.0.self_attn.q_norm.weight" in msg
  assert "model.norm.weight: (63,), expected (64,)" in msg


def test_export_refuses_what_llama_cannot_hold(tmp_path):
  cfg = model_lib.ModelConfig(vocab_size=16, hidden_size=8, num_layers=1,
                              num_attention_heads=2, ffn_hidden_size=8, activation="gelu",
                              normalization="layernorm")
  with pytest.raises(CheckpointError, match="activation 'gelu'.*normalization 'layernorm'"):
    hf.save_hf(str(tmp_path / "x"), cfg, S.random_params(cfg))
