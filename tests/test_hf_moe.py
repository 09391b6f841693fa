"""The mixture-of-experts families (model/moe.py, formats/hf_moe.py) against transformers.

Each family is a tiny random model made with transformers' own config and model classes: 2
layers, 8 experts, top-2 routing (Qwen3-MoE without renormalising, Mixtral renormalising,
OLMoE with its whole-projection q/k norms, Qwen2-MoE with its sigmoid-gated shared expert,
renormalised routing and one dense layer), saved with save_pretrained (per-expert tensors).
The logits, packed rows, greedy decoding and export checks are test_hf_families' (its
helpers); the router aux loss is checked against transformers' load_balancing_loss_func.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dpojax import config as config_lib
from dpojax import generate as generate_lib
from dpojax.formats import convert_common, hf, hf_config, hf_moe, nemo
from dpojax.model import lora as lora_lib
from dpojax.model import moe as moe_lib
from dpojax.model import transformer
from dpojax.model.config import ModelConfig, MoeConfig
from dpojax.train import loop
from dpojax.train import step as step_lib

import stories260k as S
from conftest import ROOT, tiny_config
from test_hf_families import (COMMON, SEGMENTS, STD, T, WINDOW, _dpo_metrics, _hf_logits, _logits,
                              _rows)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

MOE = dict(num_experts=8, num_experts_per_tok=2)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        MOE, moe_intermediate_size=16, head_dim=12, router_aux_loss_coef=0.02)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(MOE, intermediate_size=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        MOE, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        mlp_only_layers=[1], norm_topk_prob=True)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=4, intermediate_size=32, head_dim=8,
        sliding_window=WINDOW, swiglu_limit=0.3,  # Low enough to clamp many activations.
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 1000.0})),
}
EXPECTED = {
    "qwen3_moe": dict(qk_norm=True, kv_channels=12),
    "mixtral": dict(rotary_base=1e6),
    "olmoe": dict(qk_norm=True, qk_norm_all_heads=True),
    "qwen2_moe": dict(qkv_bias=True),
    "gpt_oss": dict(attention_sinks=True, bias=True, rope_scaling="yarn", sliding_window=WINDOW,
                    rope_yarn_truncate=False, rotary_base=1000.0,
                    layer_types=("sliding_attention", "full_attention")),
}
EXPECTED_MOE = {
    "qwen3_moe": dict(norm_topk_prob=False, router_aux_loss_coef=0.02, ffn_hidden_size=16),
    "mixtral": dict(norm_topk_prob=True),
    "olmoe": dict(norm_topk_prob=False, router_aux_loss_coef=0.01),
    "qwen2_moe": dict(norm_topk_prob=True, shared_expert_size=24, dense_layers=(1,)),
    "gpt_oss": dict(router="topk_softmax", router_bias=True, expert_bias=True, top_k=4,
                    activation="swiglu_clamped", swiglu_limit=0.3),
}


def _hf_model(name):
  config_cls, model_cls, extra = FAMILIES[name]
  config = getattr(transformers, config_cls)(**{**COMMON, **extra})
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + 1.0 if "norm" in pname else torch.randn_like(p) * STD)
  return model.eval()


def _torch_model(folder, dtype):
  """Eager attention and the experts' own loop (the reference implementation; transformers'
  default grouped_mm has no float64)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager",
      experts_implementation="eager").eval()
  return model.double() if dtype == "float64" else model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  base = tmp_path_factory.mktemp("moe_families")
  out = {}
  for name in FAMILIES:
    out[name] = str(base / name)
    _hf_model(name).save_pretrained(out[name])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_packed_rows_and_greedy_equal_transformers(name, folders):
  """As test_hf_families': fp32 within 2e-6 x max|logit| of HF fp64 and fp32, fp64 within
  1e-5, each packed sequence as if alone, 32 greedy tokens through the KV cache."""
  loaded = hf.load_hf(folders[name])
  cfg, params = loaded.config, loaded.params
  assert cfg.moe.num_experts == 8 and cfg.moe.top_k == (4 if name == "gpt_oss" else 2)
  for key, value in EXPECTED[name].items():
    assert getattr(cfg, key) == value, (name, key, getattr(cfg, key))
  for key, value in EXPECTED_MOE[name].items():
    assert getattr(cfg.moe, key) == value, (name, key, getattr(cfg.moe, key))
  tokens, positions, segments = _rows(np.random.default_rng(0))
  ours = np.asarray(_logits(cfg, params, tokens, positions, segments))
  hf32, hf64 = _torch_model(folders[name], "float32"), _torch_model(folders[name], "float64")
  want64, want32 = _hf_logits(hf64, tokens[0]), _hf_logits(hf32, tokens[0])
  scale = np.abs(want64).max()
  assert scale > 1.0
  assert np.abs(ours[0] - want64).max() <= 2e-6 * scale, np.abs(ours[0] - want64).max()
  assert np.abs(ours[0] - want32).max() <= 2e-6 * scale, np.abs(ours[0] - want32).max()
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
  assert np.abs(ours64[0] - want64).max() <= 1e-5, np.abs(ours64[0] - want64).max()
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
    assert json.load(f)["architectures"] == [FAMILIES[name][1]]
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
      output_loading_info=True)
  assert type(model).__name__ == FAMILIES[name][1]
  assert all(not v for v in info.values()), info
  tokens = np.random.default_rng(1).integers(3, COMMON["vocab_size"], T)
  np.testing.assert_array_equal(_hf_logits(model.eval(), tokens),
                                _hf_logits(_torch_model(folders[name], "float32"), tokens))
  again = hf.load_hf(out)
  assert again.config == loaded.config
  S.assert_bitwise(again.params, loaded.params)
  # The run's choices are not architecture: a folder does not hold them.
  run = dataclasses.replace(loaded.config, moe=dataclasses.replace(
      loaded.config.moe, aux_loss_coef=0.0, freeze_router=True, grouped_impl="ragged"))
  assert hf_config.config_to_json(run, {}) == hf_config.config_to_json(loaded.config, {})


def test_attention_sinks_fall_back_to_xla_by_name(folders):
  cfg = hf.load_hf(folders["gpt_oss"]).config
  for impl in ("flash", "sparse"):
    path = transformer.attention_path(dataclasses.replace(cfg, attention_impl=impl))
    assert path == f"{impl} -> xla ({impl} has no attention sinks)"
  assert transformer.attention_path(dataclasses.replace(cfg, attention_impl="xla")).startswith(
      "xla (attention sinks, window 6 on 1/2 layers")


def test_nemo_export_refuses_moe(folders, tmp_path):
  loaded = hf.load_hf(folders["mixtral"])
  with pytest.raises(hf.CheckpointError, match=r"cannot hold a mixture-of-experts model "
                     r"\(model.moe.num_experts=8\); export to a Hugging Face folder"):
    nemo.save_nemo(str(tmp_path / "m.nemo"), *loaded)
  assert not os.path.exists(tmp_path / "m.nemo")


def _padded_rows(rng):
  """Two rows, the second padded (segment 0) after 15 tokens."""
  tokens = rng.integers(3, COMMON["vocab_size"], (2, T)).astype(np.int32)
  mask = np.ones((2, T), np.int32)
  mask[1, 15:] = 0
  positions = np.tile(np.arange(T, dtype=np.int32), (2, 1))
  return tokens, positions, mask


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_aux_loss_equals_load_balancing_loss_func(name, folders):
  """Over the real tokens only: transformers' function on its own router logits with the
  attention mask equals ours from our statistics (the dense layer of Qwen2-MoE excluded)."""
  loaded = hf.load_hf(folders[name])
  cfg, params = loaded.config, loaded.params
  tokens, positions, mask = _padded_rows(np.random.default_rng(2))
  _, stats = jax.jit(_apply_moe(cfg))(params, tokens, positions, mask)
  ours = float(moe_lib.aux_loss(stats, cfg))
  model = _torch_model(folders[name], "float32")
  module = __import__(type(model).__module__, fromlist=["load_balancing_loss_func"])
  with torch.no_grad():
    out = model(torch.as_tensor(tokens).long(), attention_mask=torch.as_tensor(mask),
                output_router_logits=True)
  assert len(out.router_logits) == sum(cfg.moe_layers)
  want = float(module.load_balancing_loss_func(out.router_logits, 8, cfg.moe.top_k,
                                               torch.as_tensor(mask)))
  assert abs(ours - want) <= 1e-6, (ours, want)
  assert abs(float(out.aux_loss) - want) <= 1e-7
  # The router z-loss: mean over real tokens and MoE layers of logsumexp(logits)^2.
  real = mask.reshape(-1) > 0
  lse = [torch.logsumexp(l.double(), -1).numpy()[real] for l in out.router_logits]
  want_z = np.mean(np.square(np.concatenate(lse)))
  assert abs(float(moe_lib.z_loss(stats, cfg)) - want_z) <= 1e-6 * max(want_z, 1.0)
  # Padding counts nowhere: the same loss with the padded row's pad tokens changed.
  tokens2 = tokens.copy()
  tokens2[1, 15:] = 7
  _, stats2 = jax.jit(_apply_moe(cfg))(params, tokens2, positions, mask)
  assert float(moe_lib.aux_loss(stats2, cfg)) == ours


def _apply_moe(cfg):
  return lambda p, t, pos, seg: transformer.apply(p, cfg, t, pos, seg, return_moe=True)


def _dpo_batch(rng, micro=2):
  """[A, rows, T] batch of 2 pairs per micro-batch, padded rows (one sequence each)."""
  rows, t, vocab = 4, 16, COMMON["vocab_size"]
  tokens = rng.integers(3, vocab, (micro, rows, t)).astype(np.int32)
  lengths = rng.integers(9, t + 1, (micro, rows))
  seg = (np.arange(t)[None, None] < lengths[..., None]).astype(np.int32)
  loss_mask = seg * (np.arange(t)[None, None] >= 4)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(t, dtype=np.int32),
                                                         tokens.shape).copy(),
          "segment_ids": seg, "loss_mask": loss_mask.astype(np.int32),
          "sequence_ids": np.broadcast_to(np.arange(rows, dtype=np.int32)[:, None],
                                          tokens.shape).copy() * seg - (1 - seg),
          "pair_mask": np.ones((micro, rows // 2), np.float32),
          "chosen_reward": np.zeros((micro, rows // 2), np.float32),
          "rejected_reward": np.zeros((micro, rows // 2), np.float32)}


@pytest.mark.slow
def test_step_gradient_includes_the_aux_loss_and_freeze_router(folders):
  """With coef > 0 the step's update is AdamW of grad(DPO loss + coef x aux) (autodiff of
  the sum, each micro-batch's aux averaged); with freeze_router the routers stay bitwise."""
  loaded = hf.load_hf(folders["qwen3_moe"])
  coef = 0.5
  cfg = dataclasses.replace(loaded.config, moe=dataclasses.replace(loaded.config.moe,
                                                                    aux_loss_coef=coef))
  params = jax.tree.map(jnp.asarray, loaded.params)
  batch = jax.tree.map(jnp.asarray, _dpo_batch(np.random.default_rng(3)))
  step_cfg = step_lib.StepConfig(model=cfg, beta=0.1)

  def total(p):  # Independent of micro_loss's bookkeeping: the loss written out.
    out = 0.0
    for a in range(2):
      micro = jax.tree.map(lambda x: x[a], batch)
      h, stats = transformer.apply(p, cfg, micro["tokens"], micro["positions"],
                                   micro["segment_ids"], return_moe=True)
      hr = transformer.apply(params, cfg, micro["tokens"], micro["positions"],
                             micro["segment_ids"])
      logits = lambda hh: jnp.einsum("btd,vd->btv", hh, p["output"])
      def seq_logps(hh, w):
        lp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", hh, w), -1)
        tgt = micro["tokens"][:, 1:]
        tok = jnp.take_along_axis(lp[:, :-1], tgt[..., None], -1)[..., 0]
        return jnp.sum(tok * micro["loss_mask"][:, 1:], -1).reshape(-1, 2)
      del logits
      pol, ref = seq_logps(h, p["output"]), seq_logps(jax.lax.stop_gradient(hr),
                                                      params["output"])
      margin = 0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
      out = out + jnp.sum(-jax.nn.log_sigmoid(margin)) / 4.0
      out = out + coef * moe_lib.aux_loss(stats, cfg) / 2
    return out

  want = jax.grad(total)(params)
  tx = __import__("optax").sgd(1.0)
  state = step_lib.init_state(params, tx)
  new, metrics = jax.jit(lambda s, b: step_lib.train_step(
      s, params, b, cfg=step_cfg, tx=tx, schedule=lambda _: 1.0))(state, batch)
  got = jax.tree.map(lambda a, b: a - b, params, new.params)  # sgd(1): the gradient.
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = _at(want, path)
    assert np.allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6 * (
        1 + np.abs(np.asarray(w)).max())), path
  router_grad = np.abs(np.asarray(want["layers"]["moe"]["router"])).max()
  assert router_grad > 1e-4  # The aux loss reaches the routers.
  assert float(metrics["moe_aux_loss"]) > 0 and float(metrics["_moe_forwards"]) == 2
  # freeze_router: AdamW with weight decay, still bitwise routers.
  frozen_cfg = dataclasses.replace(step_cfg, model=dataclasses.replace(cfg, moe=dataclasses.replace(
      cfg.moe, freeze_router=True)))
  adamw = __import__("optax").adamw(1e-2, weight_decay=0.1)
  state = step_lib.init_state(params, adamw)
  run = jax.jit(lambda s, b: step_lib.train_step(s, params, b, cfg=frozen_cfg, tx=adamw,
                                                  schedule=lambda _: 1e-2))
  for _ in range(2):
    state, _ = run(state, batch)
  np.testing.assert_array_equal(state.params["layers"]["moe"]["router"],
                                params["layers"]["moe"]["router"])
  assert not np.array_equal(state.params["layers"]["moe"]["experts_fc1"],
                            params["layers"]["moe"]["experts_fc1"])


def _at(tree, path):
  for p in path:
    tree = tree[p.key]
  return tree


def test_finalize_metrics_reports_aux_loss_and_load_imbalance():
  from dpojax import loss as loss_lib  # pylint: disable=g-import-not-at-top
  sums = {"num_pairs": 2.0, "moe_aux_loss": 3.0, "_moe_forwards": 2.0,
          "_moe_expert_tokens": np.array([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])}
  out = loss_lib.finalize_metrics(sums)
  assert out["moe_aux_loss"] == 1.5
  assert out["moe_load_imbalance_layer0"] == 3.0  # max 3 over mean 1.
  assert "moe_load_imbalance_layer1" not in out  # A dense layer.
  assert config_lib is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_dequantization_equals_transformers_bitwise(dtype):
  """Random blocks and scales over the whole uint8 range (overflowing exponents included)."""
  mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
  rng = np.random.default_rng(4)
  blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)
  scales = rng.integers(0, 256, (3, 10, 4), dtype=np.uint8)
  ours = hf_moe.dequantize_mxfp4(blocks, scales, convert_common.numpy_dtype(dtype))
  want = convert_common.torch_to_numpy(mxfp4.convert_moe_packed_tensors(
      torch.from_numpy(blocks), torch.from_numpy(scales), dtype=getattr(torch, dtype)))
  assert ours.shape == want.shape == (3, 4 * 32, 10) and ours.dtype == want.dtype
  bits = np.uint16 if dtype == "bfloat16" else np.uint32
  np.testing.assert_array_equal(ours.view(bits), want.view(bits))


def test_gpt_oss_mxfp4_folder_loads_dequantized(folders, tmp_path):
  """A gpt-oss folder with MXFP4 experts (as on the hub) loads as the plain folder of
  transformers' dequantized tensors does."""
  mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
  src = folders["gpt_oss"]
  tensors = load_file(os.path.join(src, hf.SINGLE))
  plain, packed = dict(tensors), dict(tensors)
  rng = np.random.default_rng(5)
  for key in [k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))]:
    e, c, r = tensors[key].shape  # Blocks: [E, R, C / 32, 16].
    blocks = rng.integers(0, 256, (e, r, c // 32, 16), np.uint8)
    scales = rng.integers(120, 130, blocks.shape[:-1], np.uint8)
    plain[key] = convert_common.torch_to_numpy(mxfp4.convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32))
    del packed[key]
    packed[key + "_blocks"], packed[key + "_scales"] = blocks, scales
  for name, t in (("plain", plain), ("packed", packed)):
    (tmp_path / name).mkdir()
    shutil.copy(os.path.join(src, hf.CONFIG), tmp_path / name / hf.CONFIG)
    save_file(t, str(tmp_path / name / hf.SINGLE), metadata={"format": "pt"})
  got, want = hf.load_hf(str(tmp_path / "packed")), hf.load_hf(str(tmp_path / "plain"))
  assert got.config == want.config
  S.assert_bitwise(got.params, want.params)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_dpo_steps_from_each_family(name, folders, tmp_path):
  """init.path = the family's folder, through the command line: step 0 is ln 2, the loss
  falls, and the aux loss and per-layer load imbalance are in metrics.jsonl."""
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "dpojax.main", f"--config={ROOT}/tests/configs/tiny.py",
          f"--config.init.path={folders[name]}", "--config.train.max_steps=4",
          "--config.eval.interval=4", "--config.checkpoint.interval=4", f"--workdir={workdir}"]
  subprocess.run(args, check=True, cwd=ROOT, capture_output=True)
  val, train = _dpo_metrics(workdir, "val"), _dpo_metrics(workdir, "train")
  assert [r["step"] for r in val] == [0, 4] and [r["step"] for r in train] == [1, 2, 3, 4]
  assert abs(val[0]["loss"] - np.log(2)) < 1e-6 and val[0]["accuracy"] == 0.0, val[0]
  assert train[-1]["loss"] < train[0]["loss"] - 0.05, [r["loss"] for r in train]
  assert val[-1]["loss"] < val[0]["loss"], val
  layers = [0] if name == "qwen2_moe" else [0, 1]  # Its layer 1 is dense.
  for r in train:
    assert r["moe_aux_loss"] > 0
    assert sorted(k for k in r if k.startswith("moe_load_imbalance")) == [
        f"moe_load_imbalance_layer{i}" for i in layers]
    assert all(r[f"moe_load_imbalance_layer{i}"] >= 1.0 for i in layers)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_lora_experts_adapters_equal_their_merge(name, folders):
  """Per-expert adapters through the grouped matmuls equal the merged weights' model; zero B
  (their init) is the base model exactly."""
  loaded = hf.load_hf(folders[name])
  cfg, base = loaded.config, jax.tree.map(jnp.asarray, loaded.params)
  lcfg = lora_lib.LoraConfig(targets=("attention", "experts"), rank=4, alpha=8.0)
  adapters = lora_lib.init(cfg, lcfg, jax.random.key(0))
  assert adapters["layers"]["moe"]["fc1"]["lora_b"].shape == (2, 8, 4, 2, cfg.moe.ffn_hidden_size)
  tokens, positions, segments = _rows(np.random.default_rng(6))
  run = jax.jit(lambda b, a: lora_lib.apply(b, a, cfg, lcfg, tokens, positions, segments))
  plain = jax.jit(lambda b: transformer.apply(b, cfg, tokens, positions, segments))(base)
  np.testing.assert_allclose(run(base, adapters), plain, rtol=1e-6, atol=1e-6)
  rng = np.random.default_rng(7)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype),
                          adapters)
  got = run(base, adapters)
  merged = lora_lib.merge(base, adapters, cfg, lcfg)
  want = transformer.apply(merged, cfg, tokens, positions, segments)
  assert np.abs(np.asarray(got - plain)).max() > 1e-2  # The adapters do something.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lora_experts_dpo_steps(folders, tmp_path):
  """LoRA on the attention and the experts of a Qwen3-MoE checkpoint: ln 2 at step 0, falls."""
  config = tiny_config()
  config.init.path = folders["qwen3_moe"]
  config.lora.enabled, config.lora.targets, config.lora.rank = True, ("attention", "experts"), 8
  config.train.learning_rate = 1e-2
  config.train.max_steps = 4
  config.eval.interval = config.checkpoint.interval = 4
  workdir = str(tmp_path / "run")
  loop.run(config, workdir)
  val, train = _dpo_metrics(workdir, "val"), _dpo_metrics(workdir, "train")
  assert abs(val[0]["loss"] - np.log(2)) < 1e-6, val[0]
  assert train[-1]["loss"] < train[0]["loss"] - 0.05, [r["loss"] for r in train]


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_active_params_count_what_a_token_uses(name, folders):
  """From the parameter tree itself: every leaf, less the unrouted experts' share of the
  expert leaves in MoE layers, less each layer's unused kind (Qwen2-MoE's dense layer)."""
  cfg, params = hf.load_hf(folders[name])[:2]
  moe_rows = np.asarray(cfg.moe_layers)
  e, k = cfg.moe.num_experts, cfg.moe.top_k
  want = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    if keys[0] != "layers":
      want += leaf.size
      continue
    per_layer = leaf.size / cfg.num_layers
    if keys[1] == "moe":
      used = moe_rows.sum() * (k / e if keys[2].startswith("experts") else 1.0)
    elif keys[1] == "mlp":
      used = (~moe_rows).sum()
    else:
      used = cfg.num_layers
    want += per_layer * used
  n = sum(x.size for x in jax.tree.leaves(params))
  assert moe_lib.active_params(cfg, n) == int(want)
  assert moe_lib.active_params(cfg, n) < n


def test_run_overrides_keep_the_checkpoints_architecture(folders, tmp_path):
  """init.path's MoE architecture with the run's own choices (model.moe.aux_loss_coef=0,
  freeze_router, grouped_impl), as pretrained.load_pretrained merges them."""
  from dpojax import pretrained  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.init.path = folders["qwen3_moe"]
  config.model.moe.aux_loss_coef = 0.0
  config.model.moe.freeze_router = True
  config.model.moe.grouped_impl = "ragged"
  cfg = pretrained.load_pretrained(config, str(tmp_path)).config
  assert (cfg.moe.num_experts, cfg.moe.router_aux_loss_coef) == (8, 0.02)
  assert cfg.moe.aux_coef == 0.0 and cfg.moe.freeze_router and cfg.moe.grouped_impl == "ragged"
  config.model.moe.aux_loss_coef = None
  assert pretrained.load_pretrained(config, str(tmp_path)).config.moe.aux_coef == 0.02


@pytest.mark.slow
def test_remat_gives_the_same_moe_gradients():
  cfg = ModelConfig(moe=MoeConfig(num_experts=4, top_k=2, ffn_hidden_size=8,
                                                      tile=4), num_layers=2)
  params = transformer.init_params(cfg, jax.random.key(0))
  tokens, positions, segments = _rows(np.random.default_rng(8))

  def grads(remat):
    c = dataclasses.replace(cfg, remat=remat)
    def loss(p):
      h, stats = transformer.apply(p, c, tokens, positions, segments, return_moe=True)
      return jnp.sum(jnp.square(h)) + moe_lib.aux_loss(stats, c)
    return jax.jit(jax.grad(loss))(params)

  want = grads("none")
  for remat in ("full", "dots"):
    # fp32: recomputation may fuse and round differently; a routing flip would be far larger.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=1e-5 * float(np.abs(b).max())), grads(remat), want)
