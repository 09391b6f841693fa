"""How far two fp32 runs of the same Llama can be apart: our logits, transformers' fp32 and
fp64 logits on the stories260K folder (tests/testdata), for the model cut to 1..5 layers.

Issue 7 asks for |ours - transformers| <= 1e-5 in fp32. This prints, per depth, the max
absolute difference of ours (fp32) against transformers fp32 and fp64, and of transformers'
own fp32 against its fp64: the last column is the rounding floor of an fp32 forward.
Needs the test extras (torch, transformers).
Run: python scripts/hf_fp32_floor.py [--depths 1 2 ...]  (default: every depth, 1..5)
tests/test_scripts.py runs it with --depths 1 2.
"""

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import stories260k as S  # noqa: E402  (tests/stories260k.py: the fixture's paths)

from dpojax import model as model_lib  # noqa: E402
from dpojax.formats import hf  # noqa: E402


def ours(cfg, params, tokens, depth):
  cut = dataclasses.replace(cfg, num_layers=depth)
  cut_params = {**params, "layers": jax.tree.map(lambda x: x[:depth], params["layers"])}

  @jax.jit
  def logits(p, t):
    pos = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
    h = model_lib.apply(p, cut, t, pos, jnp.ones_like(t))
    return jnp.einsum("btd,vd->btv", h, model_lib.output_weight(p, cut), precision="highest")

  return np.asarray(logits(cut_params, jnp.asarray(tokens)))


def theirs(tokens, depth, dtype):
  model = transformers.LlamaForCausalLM.from_pretrained(
      S.HF_DIR, dtype=torch.float32, attn_implementation="eager").eval().to(dtype)
  model.model.layers = model.model.layers[:depth]
  model.config.num_hidden_layers = depth
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depths", type=int, nargs="+", help="layer counts (default: 1..all)")
  args = p.parse_args()
  cfg, params, _ = hf.load_hf(S.HF_DIR)
  rng = np.random.default_rng(0)
  ids = [1] + S.REFERENCE["greedy_ids"]
  tokens = np.stack([ids, rng.integers(0, cfg.vocab_size, len(ids))]).astype(np.int32)
  print("layers  ours-HF32  ours-HF64  HF32-HF64  max|logit|")
  for depth in args.depths or range(1, cfg.num_layers + 1):
    a = ours(cfg, params, tokens, depth)
    b32, b64 = theirs(tokens, depth, torch.float32), theirs(tokens, depth, torch.float64)
    d = lambda x, y: np.abs(x - y).max()
    print(f"{depth:6d}  {d(a, b32):9.2e}  {d(a, b64):9.2e}  {d(b32, b64):9.2e}  "
          f"{np.abs(b64).max():10.1f}")


if __name__ == "__main__":
  main()
