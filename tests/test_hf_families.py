"""The Hugging Face families (formats/hf_config.py) against transformers, the oracle.

Each family is a tiny random model made here with transformers' own config and model classes,
its special options on (llama3 RoPE scaling; Qwen2 q/k/v biases, yarn and sliding layers;
Qwen3 q/k norms with head_dim != hidden / heads; Mistral's window; Gemma 2's softcaps,
query_pre_attn_scalar and alternating windows; Gemma 3's q/k norms, local RoPE base and
scaled global RoPE), windows shorter than the test sequences, and saved with save_pretrained.
Weights are drawn at STD (not transformers' 0.02) so that logits spread and a rounding-level
difference cannot flip a greedy argmax, and not larger: transformers' "float64" models still
run their RMSNorm and attention softmax in fp32, so its fp64 logits carry fp32 rounding that
grows with the activations (weights at 0.3 put it at 2e-5; at 0.12 it is under 1e-6).
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dpojax import generate as generate_lib
from dpojax import model as model_lib
from dpojax.formats import hf, hf_config
from dpojax.ops import logprob_chunked
from dpojax.train import loop

from conftest import ROOT, tiny_config
import stories260k as S

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

COMMON = dict(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
STD = 0.12  # Weights (not norms).
WINDOW = 6  # Shorter than every test sequence.
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=12)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=12)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=12,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=12, sliding_window_pattern=2,
        rope_local_base_freq=100.0, rope_theta=1000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
}
# What each family must have turned on in dpojax's config (so the test exercises it).
EXPECTED = {
    "llama3": dict(rope_scaling="llama3", share_embeddings_and_output_weights=True),
    "qwen2": dict(qkv_bias=True, rope_scaling="yarn", sliding_window=WINDOW,
                  layer_types=("full_attention", "sliding_attention")),
    "qwen3": dict(qk_norm=True, kv_channels=12),
    "mistral": dict(sliding_window=WINDOW, layer_types=None, kv_channels=12),
    "gemma2": dict(normalization="rmsnorm1p", activation="geglu", post_norms=True,
                   scale_embeddings=True, attention_softcap=5.0, final_logit_softcap=3.0,
                   query_pre_attn_scalar=12.0,
                   layer_types=("sliding_attention", "full_attention")),
    "gemma3": dict(qk_norm=True, rotary_base=1000.0, rotary_base_local=100.0,
                   rope_scaling="linear", rope_scaling_factor=2.0, post_norms=True),
}
SEGMENTS = (8, 10, 6)  # The packed row; T = 24.
T = sum(SEGMENTS)


def _hf_model(name):
  config_cls, model_cls, extra = FAMILIES[name]
  config = getattr(transformers, config_cls)(**COMMON, **extra)
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config)
  gemma = name.startswith("gemma")
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:  # Around 1 (Gemma: around 0, as its norms add 1).
        p.copy_(torch.randn_like(p) * 0.1 + (0.0 if gemma else 1.0))
      else:
        p.copy_(torch.randn_like(p) * STD)
  return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  base = tmp_path_factory.mktemp("families")
  out = {}
  for name in FAMILIES:
    out[name] = str(base / name)
    _hf_model(name).save_pretrained(out[name])
  return out


def _torch_model(folder, dtype):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager").eval()
  return model.double() if dtype == "float64" else model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens)[None]).long()).logits[0].numpy()


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens_BxT, positions_BxT, segments_BxT):
  h_BxTxD = model_lib.apply(params, cfg, tokens_BxT, positions_BxT, segments_BxT)
  logits = jnp.einsum("btd,vd->btv", h_BxTxD, model_lib.output_weight(params, cfg),
                      precision="highest")
  return logprob_chunked.softcap(logits, cfg.final_logit_softcap)


def _rows(rng):
  """Row 0: one sequence of T tokens; row 1: SEGMENTS packed, positions restarting."""
  tokens = rng.integers(3, COMMON["vocab_size"], (2, T)).astype(np.int32)
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(SEGMENTS)])
  pos = np.concatenate([np.arange(n) for n in SEGMENTS])
  positions = np.stack([np.arange(T), pos]).astype(np.int32)
  segments = np.stack([np.ones(T), seg]).astype(np.int32)
  return tokens, positions, segments


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_packed_rows_and_greedy_equal_transformers(name, folders):
  """fp32 logits within 2e-6 x max|logit| of HF's fp64 and fp32 (see test_hf for why that
  bound: HF's own fp32 is ~1e-5 off its fp64), our fp64 within 1e-5 of HF's fp64, each packed
  sequence as if alone, and 32 greedy tokens through the KV cache equal HF's generate."""
  loaded = hf.load_hf(folders[name])
  cfg, params = loaded.config, loaded.params
  for key, value in EXPECTED[name].items():
    assert getattr(cfg, key) == value, (name, key, getattr(cfg, key))
  tokens, positions, segments = _rows(np.random.default_rng(0))
  ours = np.asarray(_logits(cfg, params, tokens, positions, segments))
  hf32, hf64 = _torch_model(folders[name], "float32"), _torch_model(folders[name], "float64")
  want64, want32 = _hf_logits(hf64, tokens[0]), _hf_logits(hf32, tokens[0])
  scale = np.abs(want64).max()
  assert scale > 1.0
  assert np.abs(ours[0] - want64).max() <= 2e-6 * scale, np.abs(ours[0] - want64).max()
  assert np.abs(ours[0] - want32).max() <= 2e-6 * scale, np.abs(ours[0] - want32).max()
  # Packed: each sequence equals HF run on it alone.
  start = 0
  for n in SEGMENTS:
    alone = _hf_logits(hf64, tokens[1, start:start + n])
    got = ours[1, start:start + n]
    assert np.abs(got - alone).max() <= 2e-6 * np.abs(alone).max(), (name, start)
    start += n
  with jax.enable_x64(True):
    cfg64 = dataclasses.replace(cfg, dtype="float64", param_dtype="float64")
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ours64 = np.asarray(_logits(cfg64, p64, tokens, positions, segments))
  assert ours64.dtype == np.float64
  print(f"{name}: |logit| max {scale:.2f}; / max: ours fp32 vs HF fp64 "
        f"{np.abs(ours[0] - want64).max() / scale:.2e}, vs HF fp32 "
        f"{np.abs(ours[0] - want32).max() / scale:.2e}, HF fp32 vs fp64 "
        f"{np.abs(want32 - want64).max() / scale:.2e}; ours fp64 vs HF fp64 "
        f"{np.abs(ours64[0] - want64).max():.2e} absolute")
  assert np.abs(ours64[0] - want64).max() <= 1e-5, np.abs(ours64[0] - want64).max()
  # Greedy decoding, 5 prompt tokens + 32 new (past the window), through the KV cache.
  prompt = tokens[0, :5]
  ids = generate_lib.generate(params, cfg, [prompt.tolist()], max_new_tokens=32)[0]
  with torch.no_grad():
    out = hf32.generate(torch.as_tensor(prompt[None]).long(), do_sample=False,
                        max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                        pad_token_id=0)
  assert ids == out[0, 5:].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_in_transformers_and_round_trips_bitwise(name, folders, tmp_path):
  loaded = hf.load_hf(folders[name])
  out = str(tmp_path / "export")
  hf.save_hf(out, *loaded)
  with open(os.path.join(out, hf.CONFIG)) as f:
    written = json.load(f)
  assert written["architectures"] == [FAMILIES[name][1]]
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert type(model).__name__ == FAMILIES[name][1]
  assert all(not v for v in info.values()), info  # No missing, unexpected or mismatched keys.
  tokens = np.random.default_rng(1).integers(3, COMMON["vocab_size"], T)
  np.testing.assert_array_equal(_hf_logits(model.eval(), tokens),
                                _hf_logits(_torch_model(folders[name], "float32"), tokens))
  again = hf.load_hf(out)
  assert again.config == loaded.config
  S.assert_bitwise(again.params, loaded.params)


def test_sharded_fp16_and_multimodal_gemma3_folders(folders, tmp_path):
  """fp16 weights in a sharded index round trip; a Gemma3ForConditionalGeneration folder's
  text model (both tensor prefixes transformers has written) loads as the text-only one."""
  text = hf.load_hf(folders["gemma3"])
  half = jax.tree.map(lambda x: x.astype(np.float16), text.params)
  cfg16 = dataclasses.replace(text.config, param_dtype="float16")
  hf.save_hf(str(tmp_path / "fp16"), cfg16, half, max_shard_bytes=20000)
  assert os.path.isfile(tmp_path / "fp16" / hf.INDEX)
  back = hf.load_hf(str(tmp_path / "fp16"))
  assert back.config == cfg16
  S.assert_bitwise(back.params, half)
  with open(os.path.join(folders["gemma3"], hf.CONFIG)) as f:
    text_config = json.load(f)
  tensors = load_file(os.path.join(folders["gemma3"], hf.SINGLE))
  for prefix in ("model.language_model.", "language_model.model."):
    folder = tmp_path / prefix.replace(".", "_")
    folder.mkdir()
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text_config, "vision_config": {"model_type": "siglip_vision_model"}}
    (folder / hf.CONFIG).write_text(json.dumps(config, indent=2))
    renamed = {prefix + k[len("model."):]: v for k, v in tensors.items()}
    renamed["model.vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    save_file(renamed, str(folder / hf.SINGLE), metadata={"format": "pt"})
    multi = hf.load_hf(str(folder))
    assert multi.config == text.config
    S.assert_bitwise(multi.params, text.params)
  # A text_config field error names the nested key and its line.
  config["text_config"] = {**text_config, "hidden_activation": "relu"}
  (folder / hf.CONFIG).write_text(json.dumps(config, indent=2))
  line = next(i + 1 for i, s in enumerate((folder / hf.CONFIG).read_text().splitlines())
              if '"hidden_activation"' in s)
  with pytest.raises(hf.CheckpointError, match=rf"config.json:{line}: hidden_activation: "
                     r"'relu' is not supported \(gemma3_text uses gelu_pytorch_tanh\)"):
    hf.load_hf(str(folder))


def test_exports_refuse_what_a_family_cannot_hold(folders, tmp_path):
  gemma2 = hf.load_hf(folders["gemma2"])
  # Gemma 2 with Qwen-style q/k/v biases is no family: refused, not written wrongly.
  odd = dataclasses.replace(gemma2.config, qkv_bias=True)
  with pytest.raises(hf.CheckpointError, match=r"Gemma2ForCausalLM folder cannot hold "
                     r"model.qkv_bias=True \(it says False\)"):
    hf.save_hf(str(tmp_path / "odd"), odd, _random_like(odd))
  assert not os.path.exists(tmp_path / "odd")
  # A .nemo holds none of the families' options.
  from dpojax.formats import nemo  # pylint: disable=g-import-not-at-top
  with pytest.raises(hf.CheckpointError, match=r"a .nemo .* cannot hold .*model.post_norms=True"):
    nemo.save_nemo(str(tmp_path / "g.nemo"), *gemma2)
  assert hf_config.family(gemma2.config) == "gemma2"


def _random_like(cfg):
  from dpojax.formats import convert_common  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return convert_common.unflatten({k: rng.normal(size=s).astype(np.float32)
                                   for k, s in convert_common.param_shapes(cfg).items()})


def _dpo_metrics(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r.get("split") == split]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_dpo_steps_from_each_family(name, folders, tmp_path):
  """init.path = the family's folder: step 0 (validation, before any update) is ln 2 with
  accuracy 0 (policy = reference), and the loss falls. Gemma 2 through the command line; the others through loop.run."""
  workdir = str(tmp_path / "run")
  if name == "gemma2":
    subprocess.run(
        [sys.executable, "-m", "dpojax.main", f"--config={ROOT}/tests/configs/tiny.py",
         f"--config.init.path={folders[name]}", "--config.train.max_steps=4",
         "--config.eval.interval=4", "--config.checkpoint.interval=4", f"--workdir={workdir}"],
        check=True, cwd=ROOT, capture_output=True)
  else:
    config = tiny_config()
    config.init.path = folders[name]
    if name == "qwen3":  # LoRA on every target, with head_dim != hidden / heads.
      config.lora.enabled, config.lora.targets, config.lora.rank = True, ("all",), 8
      config.train.learning_rate = 1e-2
    config.train.max_steps = 4
    config.eval.interval = config.checkpoint.interval = 4
    loop.run(config, workdir)
  val, train = _dpo_metrics(workdir, "val"), _dpo_metrics(workdir, "train")
  assert [r["step"] for r in val] == [0, 4] and [r["step"] for r in train] == [1, 2, 3, 4]
  assert abs(val[0]["loss"] - np.log(2)) < 1e-6 and val[0]["accuracy"] == 0.0, val[0]
  assert abs(train[0]["loss"] - np.log(2)) < 1e-5, train[0]  # Its update has lr 0 (warmup).
  assert train[-1]["loss"] < train[0]["loss"] - 0.05, [r["loss"] for r in train]
  assert val[-1]["loss"] < val[0]["loss"], val


def test_a_tokenizer_json_folder_travels_with_the_export(folders, tmp_path):
  """A run tokenized by a tokenizer.json exports it with its folder's files (not as a
  SentencePiece model); the exported folder's tokenizer is that file again."""
  source = os.path.join(ROOT, "tests", "testdata", "stories260k", "tokenizer")
  loaded = hf.load_hf(folders["qwen3"])
  out = tmp_path / "export"
  hf.save_hf(str(out), loaded.config, loaded.params, os.path.join(source, hf.TOKENIZER_JSON))
  for name in os.listdir(source):
    if name in hf.TOKENIZER_FILES:
      assert (out / name).read_bytes() == open(os.path.join(source, name), "rb").read(), name
  assert not (out / hf.TOKENIZER).exists()
  assert hf.load_hf(str(out)).tokenizer_path == str(out / hf.TOKENIZER_JSON)
  with open(out / hf.CONFIG) as f:
    written = json.load(f)
  auto = transformers.AutoTokenizer.from_pretrained(str(out))
  assert written["eos_token_id"] == auto.eos_token_id
