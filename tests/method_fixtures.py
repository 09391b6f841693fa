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
def stories_pair_logps(num_pairs: int = 12) -> dict:
  """{"pi", "n", "full", "full_n"}: [num_pairs, 2] float64 (chosen, rejected)."""
  import sentencepiece as spm  # Test-only oracles.
  import torch
  import transformers
  sp = spm.SentencePieceProcessor(model_file=os.path.join(HF_DIR, "tokenizer.model"))
  model = transformers.LlamaForCausalLM.from_pretrained(HF_DIR, torch_dtype=torch.float64)
  model.eval()
  with open(TOY) as f:
    pairs = [json.loads(line) for _, line in zip(range(num_pairs), f)]
  out = {k: np.zeros((num_pairs, 2)) for k in ("pi", "n", "full", "full_n")}
  for p, pair in enumerate(pairs):
    prompt = [1] + sp.encode(pair["prompt"])
    for side, key in enumerate(("chosen_response", "rejected_response")):
      ids = prompt + sp.encode(pair[key]) + [2]
      with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
      logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
      logp = logp.numpy()
      resp = logp[len(prompt) - 1:]
      out["pi"][p, side], out["n"][p, side] = resp.sum(), len(resp)
      out["full"][p, side], out["full_n"][p, side] = logp.sum(), len(logp)
  return out
