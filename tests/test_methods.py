"""SimPO, CPO, ORPO and KTO end to end: no reference in the reference-free step (arguments,
memory, FLOPs), KTO in every reference mode, the curves' panels, and training on the toy pairs
learns (slow)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from dpojax import config as config_lib
from dpojax import evaluate as evaluate_lib
from dpojax import model as model_lib
from dpojax import pretrained
from dpojax import plot
from dpojax import workdir as workdir_lib
from dpojax.data import pipeline
from dpojax.model import lora
from dpojax.train import loop
from dpojax.train import metrics as metrics_lib
from dpojax.train import reference
from dpojax.train import step as step_lib

from conftest import ROOT, tiny_config

MCFG = model_lib.ModelConfig(vocab_size=512, hidden_size=128, num_layers=1,
                             num_attention_heads=4, num_query_groups=None, ffn_hidden_size=256)


def compiled_step(loss_name: str):
  """The train step of `loss_name` compiled on shapes only, and its frozen tree."""
  params = jax.eval_shape(functools.partial(model_lib.init_params, MCFG), jax.random.key(0))
  batch = {k: jax.ShapeDtypeStruct((1, 4, 16), jnp.int32) for k in pipeline.BATCH_KEYS}
  batch.update({k: jax.ShapeDtypeStruct((1, 2), jnp.float32) for k in pipeline.PAIR_KEYS})
  tx, schedule = step_lib.make_optimizer(tiny_config().train)
  cfg = step_lib.StepConfig(
      model=MCFG, loss=config_lib.LossConfig(losses=(loss_name,), weights=(1.0,)))
  parts = reference.abstract_split(cfg, params)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), parts.trainable)
  lowered = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, tx=tx, schedule=schedule),
                    donate_argnums=0).lower(state, parts.frozen, batch)
  return cfg, parts, lowered.compile(), lora.nbytes(params)


@pytest.mark.slow
def test_reference_free_step_has_no_reference_memory_or_flops():
  """Compiled memory analysis: SimPO's step holds no reference (its frozen argument is empty)
  and needs about one parameter copy less than the live-reference DPO step; its FLOPs are
  the policy's forward and backward only (6N, where DPO adds a 2N reference forward)."""
  cfg, parts, simpo, param_bytes = compiled_step("simpo")
  assert cfg.reference == "none" and jax.tree.leaves(parts.frozen) == []
  _, _, dpo, _ = compiled_step("dpo")
  mem = {}
  for name, c in (("simpo", simpo), ("dpo", dpo)):
    m = c.memory_analysis()
    mem[name] = (m.argument_size_in_bytes, m.argument_size_in_bytes + m.temp_size_in_bytes
                 + m.output_size_in_bytes - m.alias_size_in_bytes)
  assert mem["dpo"][0] - mem["simpo"][0] == param_bytes  # Arguments: exactly one copy.
  saved = mem["dpo"][1] - mem["simpo"][1]
  print(f"params {param_bytes} B; peak (args + temp + out - alias): dpo {mem['dpo'][1]} B, "
        f"simpo {mem['simpo'][1]} B, saved {saved} B")
  assert 0.9 * param_bytes <= saved <= 1.1 * param_bytes, (saved, param_bytes, mem)
  flops = {n: c.cost_analysis()["flops"] for n, c in (("simpo", simpo), ("dpo", dpo))}
  # A forward is a third of forward + backward: the reference adds 1/3 of the policy's FLOPs.
  assert 1.25 <= flops["dpo"] / flops["simpo"] <= 1.4, flops
  print(f"compiled FLOPs: dpo {flops['dpo']:.4g}, simpo {flops['simpo']:.4g}")
  assert metrics_lib.flops_per_token(100, reference=cfg.reference) == 600


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_default_run_learns(tmp_path, name):
  """The default config's 200 steps with each method: validation accuracy > 0.9."""
  config = workdir_lib.load_config_file(os.path.join(ROOT, "configs", "dpo_gpt.py"))
  config.dpo.preference_loss = name
  config.train.peak_flops = -1.0
  config.checkpoint.async_save = False
  workdir = str(tmp_path / name)
  loop.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    val = [json.loads(line) for line in f if '"val"' in line]
  assert val[-1]["step"] == 200 and val[-1]["accuracy"] > 0.9, val[-1]
  assert val[-1]["nll_loss"] < val[0]["nll_loss"]  # TRL's NLL term (cpo_alpha = 1: on).
  if name == "orpo":
    assert val[-1]["log_odds_ratio"] > val[0]["log_odds_ratio"]
    assert val[-1]["log_odds_chosen"] > val[0]["log_odds_chosen"]


def kto_config(**sections):
  config = tiny_config()
  config.dpo.preference_loss = "kto"
  config.data.unpair = True
  config.train.max_steps = 3
  for key, value in sections.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def assert_same_records(a, b, tol):
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for ra, rb in zip(a, b):
    for key in ra:
      if key not in metrics_lib.TIMING_METRICS and key != "split":
        assert rb[key] == pytest.approx(ra[key], abs=tol, rel=tol), (ra["step"], key)


@pytest.mark.slow
def test_kto_reference_modes_agree(tmp_path):
  """KTO with the live copy, with precomputed log-probs (the KL sequences' included), and
  with LoRA's base as the reference vs LoRA with a separate copy: the same metrics."""
  runs = {}
  for name, sections in (
      ("copy", {}),
      ("precomputed", {"reference__mode": "precomputed",
                       "reference__cache_dir": str(tmp_path / "cache")}),
      ("lora_base", {"lora__enabled": True, "lora__rank": 4}),
      ("lora_copy", {"lora__enabled": True, "lora__rank": 4, "reference__mode": "copy"})):
    workdir = str(tmp_path / name)
    loop.run(kto_config(**sections), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      runs[name] = [json.loads(line) for line in f]
  assert_same_records(runs["copy"], runs["precomputed"], 1e-5)
  assert_same_records(runs["lora_copy"], runs["lora_base"], 1e-5)
  assert all("kl" in r and "rewards_chosen_mean" in r for r in runs["copy"])
  # `python -m dpojax.evaluate` of the run gives its last validation (the unpaired file).
  policy = pretrained.load_policy(str(tmp_path / "copy"))
  ref = pretrained.load_reference(policy, extract_dir=str(tmp_path / "ref"))
  config = kto_config()
  # Its batches are micro-batches (KTO's KL runs over each): the run's, in the same order.
  per_batch = config.train.global_batch_size // config.train.micro_batch_size
  got = evaluate_lib.evaluate(policy.run_config, policy.params, ref, config.data.val_path,
                              max_batches=config.eval.max_batches * per_batch)
  last = [r for r in runs["copy"] if r["split"] == "val"][-1]
  for key in ("loss", "kl", "rewards_chosen_mean", "num_desirable", "num_pairs"):
    assert got[key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key
  assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")]) == 2


@pytest.mark.slow
def test_kto_default_run_separates_rewards(tmp_path):
  """The default config's 200 steps on the toy pairs unpaired: desirable rewards rise above
  the undesirable ones, on validation."""
  config = workdir_lib.load_config_file(os.path.join(ROOT, "configs", "dpo_gpt.py"))
  config.dpo.preference_loss = "kto"
  config.data.unpair = True
  config.train.peak_flops = -1.0
  config.checkpoint.async_save = False
  workdir = str(tmp_path / "kto")
  loop.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    val = [json.loads(line) for line in f if '"val"' in line]
  assert val[0]["rewards_margin_mean"] == 0.0
  assert val[-1]["rewards_chosen_mean"] > 1.0 > -1.0 > val[-1]["rewards_rejected_mean"], val[-1]


def test_curves_gain_the_methods_panels(tmp_path):
  """ORPO's and KTO's metrics get their own panels: a third row below the 2 x 3 grid."""
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in (0, 1, 2):
      base = {k: 0.1 * step for _, lines in plot.PANELS for k, _ in lines}
      f.write(json.dumps(dict(base, step=step, split="val", nll_loss=2.0 - step,
                              log_odds_ratio=-0.6, kl=0.3)) + "\n")
  image = Image.open(plot.plot_metrics(str(tmp_path)))
  assert image.size == (1500, 1200)
  rgb = np.asarray(image.convert("RGB")).astype(int)
  red = np.array([0xd6, 0x27, 0x28])
  third_row = rgb[800:, :]
  assert (np.abs(third_row - red).sum(-1) < 60).sum() > 100  # Validation curves drawn there.
