"""Real per-sequence log-probs for the method tests: the first toy pairs under stories260K.

transformers' LlamaForCausalLM (float64, torch) scores "prompt + response" of each toy pair
tokenized by the stories260K SentencePiece model (BOS first, EOS last): the response's
summed log-prob and token count, and the whole sequence's (prompt included, as ORPO's NLL).
"""

import functools
import json
import os

import numpy as np

from stories260k import HF_DIR

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dpojax", "assets",
                   "toy_prefs_train.jsonl")


@functools.lru_cache(maxsize=None)
def _oracle():
  import sentencepiece as spm  # Test-only oracles.
  import torch
  import transformers
  sp = spm.SentencePieceProcessor(model_file=os.path.join(HF_DIR, "tokenizer.model"))
  model = transformers.LlamaForCausalLM.from_pretrained(HF_DIR, torch_dtype=torch.float64)
  model.eval()
  return sp, model, torch


def score(prompt: str, response: str) -> tuple[float, int, float, int]:
  """(response log-prob sum, its tokens, whole-sequence sum, its targets) of BOS + prompt +
  response + EOS under stories260K in float64."""
  sp, model, torch = _oracle()
  prompt_ids = [1] + sp.encode(prompt)
  ids = prompt_ids + sp.encode(response) + [2]
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
  logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
  logp = logp.numpy()
  resp = logp[len(prompt_ids) - 1:]
  return resp.sum(), len(resp), logp.sum(), len(logp)


def toy_pairs(num_pairs: int) -> list[dict]:
  with open(TOY) as f:
    return [json.loads(line) for _, line in zip(range(num_pairs), f)]


@functools.lru_cache(maxsize=None)
def stories_pair_logps(num_pairs: int = 12) -> dict:
  """{"pi", "n", "full", "full_n"}: [num_pairs, 2] float64 (chosen, rejected)."""
  out = {k: np.zeros((num_pairs, 2)) for k in ("pi", "n", "full", "full_n")}
  for p, pair in enumerate(toy_pairs(num_pairs)):
    for side, key in enumerate(("chosen_response", "rejected_response")):
      out["pi"][p, side], out["n"][p, side], out["full"][p, side], out["full_n"][p, side] = (
          score(pair["prompt"], pair[key]))
  return out


@functools.lru_cache(maxsize=None)
def stories_kto_logps(num_pairs: int = 6) -> dict:
  """The toy pairs unpaired (chosen ones, then rejected ones, as TRL's
  unpair_preference_dataset) with KL sequences rotated by one over all of them:
  {"pi": [2n] completion sums, "pi_kl": [2n] KL-sequence sums, "label": [2n] bool}."""
  pairs = toy_pairs(num_pairs)
  examples = ([(p["prompt"], p["chosen_response"], True) for p in pairs]
              + [(p["prompt"], p["rejected_response"], False) for p in pairs])
  n = len(examples)
  out = {"pi": np.zeros(n), "pi_kl": np.zeros(n), "label": np.array([e[2] for e in examples])}
  for i, (prompt, completion, _) in enumerate(examples):
    out["pi"][i] = score(prompt, completion)[0]
    out["pi_kl"][i] = score(prompt, examples[i - 1][1])[0]  # TRL: x_i with y_{i-1}.
  return out
